"""The benchmark suite: one command, every figure a ratio against a baseline measured in the same
run, interleaved. Writes `<out>/<name>.json` per benchmark, `<out>/run.json`, and renders
`<out>/README.md` and PNG plots (bench/report.py).

    python bench/run.py                    # the full suite (about an hour on 2 cores)
    python bench/run.py --quick            # every benchmark at tiny sizes, 1 rep (a smoke check);
                                           # benchmarks with QUICK = False (vLLM's compiled server) are skipped
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

from common import RESULTS, SUITE, Context, now, write_json, write_result  # noqa: E402
from procs import Resources  # noqa: E402

ORDER = list(SUITE)


def one(mod, ctx: Context) -> dict:
    """Run one benchmark, write its JSON (an error's too: one failing must not lose the others)."""
    t0 = time.perf_counter()
    goal = str(mod.GOAL) if mod.GOAL else ""
    try:
        payload = mod.run(ctx)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        payload = {"error": f"{type(e).__name__}: {e}", "headline": []}
    path = write_result(ctx, mod.NAME, mod.TITLE, goal or ("see headline" if "error" not in payload else ""), t0, payload)
    seconds = round(time.perf_counter() - t0, 1)
    if "error" in payload:
        return {"ok": False, "seconds": seconds, "error": payload["error"]}
    for h in payload.get("headline", []):
        met = "" if h["met"] is None else ("  met" if h["met"] else "  NOT met")
        print(f"[bench]   {h['label']}: {h['median']:.4g} [{h['min']:.4g}, {h['max']:.4g}]"
              f"{'  goal ' + h['goal'] if h['goal'] else ''}{met}", flush=True)
    print(f"[bench]   -> {path} ({seconds} s)", flush=True)
    return {"ok": True, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 1 repetition: a smoke check (minutes)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {','.join(ORDER)}")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory (default bench/results)")
    ap.add_argument("--note", action="append", default=[], help="a note stored in every JSON (repeatable)")
    ap.add_argument("--threads", type=int, default=0,
                    help="OMP_NUM_THREADS for this process and every child (0: leave unset). On a machine shared "
                         "with another job, 1 avoids OpenMP threads fighting over a busy core")
    ap.add_argument("--no-report", action="store_true", help="do not render README.md and plots")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or ORDER
    if unknown := [n for n in names if n not in ORDER]:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {ORDER}")
    names = [n for n in ORDER if n in names]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    notes = list(args.note)
    if args.threads:
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch is imported here; inherited by children
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
            resources.keep_only(set().union(*(modules[n].USES for n in names[i + 1:])))
    finally:
        resources.close()
    wall = time.perf_counter() - t_run
    cmd = "python bench/run.py" + (" --quick" if args.quick else "") + (f" --only {args.only}" if args.only else "") \
        + (f" --threads {args.threads}" if args.threads else "") + "".join(" --note '...'" for _ in args.note)
    write_json(out / "run.json", {"command": cmd, "quick": args.quick, "date": now(), "wall_seconds": round(wall, 1),
                                  "benchmarks": status, "notes": notes, "logs": str(logdir)})
    print(f"[bench] done in {wall:.0f} s: " + ", ".join(f"{n} {'ok' if s['ok'] else 'FAILED'} ({s['seconds']} s)"
                                                       for n, s in status.items()), flush=True)
    if not args.no_report:
        import report

        report.render(out)
        print(f"[bench] report: {out / 'README.md'}", flush=True)
    return 0 if all(s["ok"] for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
