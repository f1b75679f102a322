"""The benchmark suite: one command, every figure a ratio against a baseline measured in the same
run, interleaved. Writes `<out>/<name>.json` per benchmark and `<out>/run.json`, then renders
`<out>/README.md` and `ratios.png` (bench/report.py).

    python bench/run.py                    # the full suite (about an hour on 2 cores)
    python bench/run.py --quick            # tiny sizes, 1 rep (a smoke check); skips QUICK = False ones
    python bench/run.py --only projection_overhead,hooked_generation --out /tmp/b
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MODEL, RESULTS, SUITE, Context, git_state, machine, now  # noqa: E402
from procs import Resources  # noqa: E402

from spd_engine.atomic import write_json  # noqa: E402


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
    path = Path(ctx.out) / f"{mod.__name__}.json"
    write_json(path, {"benchmark": mod.__name__, "title": mod.TITLE, "goal": goal, "date": now(), "quick": ctx.quick,
                      "wall_seconds": seconds, "machine": machine(), "model": MODEL, "notes": ctx.notes,
                      "git": git_state(), **payload})
    if "error" in payload:
        return {"ok": False, "seconds": seconds, "error": payload["error"]}
    for h in payload["headline"]:
        met = "" if h["met"] is None else ("  met" if h["met"] else "  NOT met")
        print(f"[bench]   {h['label']}: {h['median']:.4g} [{h['min']:.4g}, {h['max']:.4g}]"
              f"{'  goal ' + h['goal'] if h['goal'] else ''}{met}", flush=True)
    print(f"[bench]   -> {path} ({seconds} s)", flush=True)
    return {"ok": True, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 1 repetition: a smoke check (minutes)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {','.join(SUITE)}")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory (default bench/results)")
    ap.add_argument("--note", action="append", default=[], help="a note stored in every JSON (repeatable)")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for this process and every child "
                    "(0: unset); 1 keeps OpenMP threads from fighting over a core another job holds")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(SUITE)
    if unknown := [n for n in names if n not in SUITE]:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {list(SUITE)}")
    names = [n for n in SUITE if n in names]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    notes = list(args.note)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch is imported; inherited by children
        notes.append(f"run with --threads {args.threads}: OMP_NUM_THREADS={args.threads} in every process")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    notes.append(f"load average at the start of the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on "
                 f"{os.cpu_count()} cores")
    logdir = Path(tempfile.mkdtemp(prefix="spd-bench-logs-"))  # engine and server logs (large): not results
    print(f"[bench] engine and server logs: {logdir}", flush=True)
    resources = Resources(logdir)
    modules = {n: importlib.import_module(n) for n in names}
    t_run = time.perf_counter()
    status: dict[str, dict] = {}
    try:
        for i, name in enumerate(names):
            mod = modules[name]
            print(f"[bench] {name}: {mod.TITLE}", flush=True)
            if args.quick and not getattr(mod, "QUICK", True):
                status[name] = {"ok": True, "seconds": 0.0, "skipped": "not run by --quick (QUICK = False: see its docstring)"}
                print("[bench]   skipped in --quick", flush=True)
            else:
                status[name] = one(mod, Context(quick=args.quick, out=out, notes=notes, resources=resources))
            resources.keep_only(set().union(*(getattr(modules[n], "USES", set()) for n in names[i + 1:])))
    finally:
        resources.close()
    wall = time.perf_counter() - t_run
    cmd = "python bench/run.py" + (" --quick" if args.quick else "") + (f" --only {args.only}" if args.only else "") \
        + (f" --threads {args.threads}" if args.threads else "") + "".join(" --note '...'" for _ in args.note)
    write_json(out / "run.json", {"command": cmd, "quick": args.quick, "date": now(), "wall_seconds": round(wall, 1),
                                  "benchmarks": status, "notes": notes, "logs": str(logdir)})
    print(f"[bench] done in {wall:.0f} s: " + ", ".join(f"{n} {'ok' if s['ok'] else 'FAILED'} ({s['seconds']} s)"
                                                       for n, s in status.items()), flush=True)
    import report

    print(f"[bench] report: {report.render(out)}", flush=True)
    return 0 if all(s["ok"] for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
