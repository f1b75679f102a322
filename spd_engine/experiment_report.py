"""The experiment's report: markdown tables with intervals and paired tests, spectra and principal
angles between the domains' subspaces (plots), stage wall times; JSON beside it."""
from __future__ import annotations

import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

from .atomic import write_bytes, write_json
from .calibrate import participation_ratio
from .stats import mcnemar_exact, paired_bootstrap
from .subspace import Store, principal_angles


def _paired(a: dict, b: dict) -> dict | None:
    """Test condition a against b on the items they share."""
    if a["metric"] != b["metric"]:
        return None
    key = "correct" if a["metric"] == "accuracy" else "span_nll"
    bv = {it["id"]: it[key] for it in b["items"]}
    pairs = [(it[key], bv[it["id"]]) for it in a["items"] if it["id"] in bv]
    if not pairs:
        return None
    xs, ys = zip(*pairs)
    return mcnemar_exact(xs, ys) if key == "correct" else paired_bootstrap(xs, ys)


def _cell(r: dict) -> str:
    return f"{r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}] (n={r['n']})"


def _vs(t: dict | None) -> str:
    return "" if t is None else f"{t['diff']:+.3f} (p={t['p']:.2f})"


def write_report(root: Path, cfg, config_path: Path, results: list[dict], corpora: list[dict], store: Store,
                 timings: list[dict]) -> None:
    find = {(r["condition"], r["train_domain"], r["eval"], r["metric"]): r for r in results}
    lines = [f"# Experiment `{cfg.name}`", "",
             f"Model `{cfg.model}`, seed {cfg.seed}, strength {cfg.strength}, conditions {', '.join(cfg.conditions)}. "
             f"Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')}.", "",
             f"Command: `spd experiment {shlex.quote(str(config_path))}`", "",
             "Cells: metric [95% interval] (n). `vs base` / `vs self-distill`: paired difference (accuracy: exact "
             "McNemar; span NLL: paired bootstrap, lower is better) with its p-value.", ""]
    paired: list[dict] = []
    for d in cfg.domains:
        lines += [f"## Trained on `{d.name}` ({d.kind}: {', '.join(d.data)})", ""]
        for metric in dict.fromkeys(m for e in cfg.domains for m in e.metrics or cfg.metrics):
            lines += [f"### {metric}", "", "| condition | eval set | " + metric + " | vs base | vs self-distill |",
                      "|---|---|---|---|---|"]
            for cond in cfg.conditions:
                for e in cfg.domains:
                    r = find.get((cond, None if cond == "base" else d.name, e.name, metric))
                    if r is None:
                        continue
                    base = find.get(("base", None, e.name, metric))
                    sd = find.get(("self-distill", d.name, e.name, metric))
                    t_base = _paired(r, base) if base and cond != "base" else None
                    t_sd = _paired(r, sd) if sd and cond != "self-distill" else None
                    paired.append({"condition": cond, "train_domain": d.name, "eval": e.name, "metric": metric,
                                   "vs_base": t_base, "vs_self_distill": t_sd})
                    tag = "" if e.name == d.name else " (out of domain)"
                    lines.append(f"| {cond} | {e.name}{tag} | {_cell(r)} | {_vs(t_base)} | {_vs(t_sd)} |")
            lines.append("")

    # what each trained condition learnt from: its self-generated corpus, scored against the gold answers
    lines += ["## Self-generated training corpora", "",
              "Each trained condition's corpus (the generation prompts, answered by the base model with the condition's "
              "mode, or none for self-distill), scored against the gold answers; top answer: the most common "
              "extracted answer and its share.", "",
              "| domain | condition | corpus accuracy | top answer (share) |", "|---|---|---|---|"]
    lines += [f"| {c['domain']} | {c['condition']} | {_cell(c)} | "
              + ("n/a" if c["top_answer_share"] is None else f"{c['top_answer']} ({c['top_answer_share']:.2f})") + " |"
              for c in corpora]
    lines.append("")

    # subspaces: spectra and principal angles between the domains' gradient subspaces
    grads = [store.load(n) for n in store.names() if n.endswith("-gradient")]
    lines += ["## Capability subspaces", "", "| subspace | site | rank | participation ratio | top-rank energy |",
              "|---|---|---|---|---|"]
    for p in grads:
        for site, spectra in sorted(p.spectra.items()):
            s = spectra[0].double()
            r = p.bases[site][0].shape[1]
            energy = float((s[:r] ** 2).sum() / (s**2).sum()) if float((s**2).sum()) > 0 else float("nan")
            lines.append(f"| {p.name} | {site[0]}.{site[1]} | {r} | {participation_ratio(s):.2f} | {energy:.3f} |")
    angles = {}
    for i, a in enumerate(grads):
        for b in grads[i + 1 :]:
            angles[f"{a.name} vs {b.name}"] = principal_angles(a, b)
    if angles:
        lines += ["", "Principal angles between domains' subspaces (degrees; 0 = shared direction, 90 = orthogonal):", "",
                  "| pair | site | min | mean | max |", "|---|---|---|---|---|"]
        for pair, sites in angles.items():
            for site, v in sites.items():
                lines.append(f"| {pair} | {site} | {min(v):.1f} | {sum(v) / len(v):.1f} | {max(v):.1f} |")
    _plots(root, grads, angles)
    lines += ["", "![spectra](spectra.png)", ""] + (["![angles](angles.png)", ""] if angles else [])

    # a cached stage keeps the wall time it took when it was computed (in an earlier run)
    total: dict[str, list[float]] = {}
    for t in timings:
        total.setdefault(t["stage"], [0.0, 0.0])[int(t["cached"])] += t["seconds"]
    lines += ["## Wall time of each stage", "", "| stage | computed in this run, s | taken from the cache, s "
              "(as recorded when computed) | total, s |", "|---|---|---|---|"]
    lines += [f"| {k} | {now:.0f} | {cached:.0f} | {now + cached:.0f} |" for k, (now, cached) in total.items()]
    lines += [f"| all | {sum(v[0] for v in total.values()):.0f} | {sum(v[1] for v in total.values()):.0f} | "
              f"{sum(sum(v) for v in total.values()):.0f} |"]
    lines += ["", "## Config", "", "```toml", Path(config_path).read_text().strip(), "```", ""]
    write_bytes(root / "report.md", "\n".join(lines).encode())
    write_json(root / "report.json", {
        "config": cfg.model_dump(), "command": " ".join(["spd", "experiment", str(config_path)]),
        "python": sys.version.split()[0],
        "results": [{k: v for k, v in r.items() if k != "items"} for r in results], "paired": paired,
        "corpora": corpora,
        "angles": angles, "timings": timings,
    })


def _plots(root: Path, grads, angles) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for p in grads:
        for site, spectra in sorted(p.spectra.items()):
            s = spectra[0].double()
            ax.semilogy((s**2 / (s**2).sum()).numpy(), label=f"{p.name} {site[0]}.{site[1]}")
    ax.set_xlabel("eigen-direction")
    ax.set_ylabel("share of gradient energy")
    ax.legend(fontsize=6)
    fig.tight_layout()
    _save(fig, root / "spectra.png")
    if not angles:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for pair, sites in angles.items():
        for site, v in sites.items():
            ax.plot(v, label=f"{pair} {site}")
    ax.set_xlabel("principal angle index")
    ax.set_ylabel("degrees")
    ax.legend(fontsize=6)
    fig.tight_layout()
    _save(fig, root / "angles.png")


def _save(fig, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_bytes(path, buf.getvalue())
