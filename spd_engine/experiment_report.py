"""The experiment's report: per condition the mean over training seeds and its spread, tests across
seeds and across items with a Holm correction over the whole report, the rank sweep and the rounds,
what each condition trained on (corpus quality, training tokens), the subspaces' spectra and principal
angles (plots), stage wall times; JSON and every per-item output beside it."""
from __future__ import annotations

import gzip
import json
import math
import re
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

from .atomic import write_bytes, write_json
from .calibrate import participation_ratio
from .stats import holm, mcnemar_exact, one_sample_t, paired_bootstrap, sign_test
from .subspace import Store, principal_angles

LOWER_IS_BETTER = {"span-nll"}
ITEMS_FILE = "items.jsonl.gz"  # the per-item outputs, beside report.md
HEADLINE = ("letter-accuracy", "accuracy", "span-nll")  # an eval set's headline score: the first of these it has
# The paper's claims (SPD_SPEC section 1), as it states them ("up to"; it does not say absolute or relative)
PAPER = {"over self-distill": "up to +13%", "over base": "+16%", "out of domain": "+15%"}
_STATED = re.compile(r"####|answer is|answer:", re.IGNORECASE)
_ITEM_KEY = {"accuracy": "correct", "letter-accuracy": "correct", "span-nll": "span_nll"}


def _group(results: list[dict]) -> dict[tuple, dict]:
    """(arm, train domain, eval set, metric) -> {seed: result row}."""
    out: dict[tuple, dict] = {}
    for r in results:
        out.setdefault((r["arm"], r["train_domain"], r["eval"], r["metric"]), {})[r["seed"]] = r
    return out


def _item_means(rows: dict) -> dict[str, float]:
    """Each item's value averaged over the seeds (booleans count as 0/1)."""
    key = _ITEM_KEY[next(iter(rows.values()))["metric"]]
    acc: dict[str, list[float]] = {}
    for r in rows.values():
        for it in r["items"]:
            acc.setdefault(it["id"], []).append(float(it[key]))
    return {k: sum(v) / len(v) for k, v in acc.items()}


def compare(a: dict, b: dict) -> dict | None:
    """Arm a against arm b (each {seed: row} for one eval set and metric).

    Across seeds: the per-seed difference of the means (a seed against the same seed of b; against an
    untrained b, its one value), a one-sample t-test and a sign test over those differences - the
    question "would the effect come back with another training seed". Across items: a paired test on
    the items' values averaged over seeds (exact McNemar when both sides have one seed and a 0/1 metric,
    else a paired bootstrap) - it treats the adapters as fixed, so it says that items moved together,
    not that the effect is reproducible."""
    if not a or not b:
        return None
    if list(b) == [None]:
        seed_diffs = [ra["value"] - b[None]["value"] for ra in a.values()]
    else:
        common = [s for s in a if s in b]
        if not common:
            return None
        seed_diffs = [a[s]["value"] - b[s]["value"] for s in common]
    ia, ib = _item_means(a), _item_means(b)
    ids = [i for i in ia if i in ib]
    if not ids:
        return None
    xs, ys = [ia[i] for i in ids], [ib[i] for i in ids]
    metric = next(iter(a.values()))["metric"]
    if metric != "span-nll" and len(a) == 1 and len(b) == 1:
        items = mcnemar_exact([x > 0.5 for x in xs], [y > 0.5 for y in ys])
    else:
        items = paired_bootstrap(xs, ys)
    return {"diff": sum(seed_diffs) / len(seed_diffs), "seed_diffs": seed_diffs, "seeds": one_sample_t(seed_diffs),
            "sign": sign_test(seed_diffs), "items": items}


def _mean_sd(vals: list[float]) -> tuple[float, float]:
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else float("nan")
    return m, sd


def _p(p: float) -> str:
    if p is None or math.isnan(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _value_cell(rows: dict) -> str:
    vals = [r["value"] for r in rows.values()]
    if len(vals) == 1:
        r = next(iter(rows.values()))
        return f"{r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
    m, sd = _mean_sd(vals)
    return f"{m:.3f} ± {sd:.3f}"


def _seed_cell(rows: dict) -> str:
    if list(rows) == [None]:
        return "-"
    return ", ".join(f"{r['value']:.3f}" for _, r in sorted(rows.items()))


def _label_of(cond: str, rank, rnd: int) -> str:
    return cond + (f" r{rank}" if rank is not None else "") + (f" round {rnd}" if rnd > 1 else "")


def write_report(root: Path, cfg, config_path: Path, results: list[dict], corpora: list[dict], training: list[dict],
                 baselines: dict, store: Store, timings: list[dict], planned: int) -> None:
    """`planned`: how many evaluations the config asks for; fewer results make a partial report (a
    cached-only run while the experiment is still under way)."""
    groups = _group(results)
    arms_info = {}  # arm label -> (condition, rank, round), in run order
    for r in results:
        arms_info.setdefault(r["arm"], (r["condition"], r["rank"], r["round"]))
    metrics = list(dict.fromkeys(r["metric"] for r in results))
    seeds = cfg.training_seeds

    # ---- every comparison of the report, then Holm over all of them (one family per kind of test)
    comparisons: list[dict] = []
    for (arm, dom, ev, metric), rows in groups.items():
        cond, rank, rnd = arms_info[arm]
        against = []
        if cond != "base":
            against.append(("base", ("base", None, ev, metric)))
        if cond not in ("base", "self-distill"):
            against.append(("self-distill", (_label_of("self-distill", None, rnd), dom, ev, metric)))
        if rnd > 1:
            against.append(("previous round", (_label_of(cond, rank, rnd - 1), dom, ev, metric)))
        for name, key in against:
            t = compare(rows, groups.get(key, {}))
            if t is not None:
                comparisons.append({"arm": arm, "train_domain": dom, "eval": ev, "metric": metric, "against": name,
                                    "against_arm": key[0], "in_domain": next(iter(rows.values()))["in_domain"], **t})
    for fam, get in (("seeds", lambda c: c["seeds"]["p"]), ("items", lambda c: c["items"]["p"])):
        for c, adj in zip(comparisons, holm([get(c) for c in comparisons])):
            c[f"{fam}_p_holm"] = adj
    n_seed_tests = sum(not math.isnan(c["seeds"]["p"]) for c in comparisons)

    lines = [f"# Experiment `{cfg.name}`", "",
             f"Model `{cfg.model}`, split seed {cfg.seed}, training seeds {', '.join(map(str, seeds))}, strength "
             f"{cfg.strength}, conditions {', '.join(cfg.conditions)}, mode rank {cfg.calibration.rank}"
             + (f", rank sweep {cfg.calibration.ranks}" if cfg.calibration.ranks else "")
             + (f", {cfg.rounds} rounds ({', '.join(cfg.round_conditions)})" if cfg.rounds > 1 else "")
             + f". Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')}.", "",
             f"Command: `spd experiment {shlex.quote(str(config_path))}`", ""]
    if len(results) < planned:
        lines += [f"**Partial: {len(results)} of the {planned} planned evaluations are in the stage cache** "
                  "(the run is still under way). Every table below holds only those; a missing cell is not yet "
                  "computed, and comparisons and Holm adjustments cover only the arms present.", ""]
    lines += ["How to read it: a cell is the mean over training seeds ± the standard deviation across seeds (one "
              "seed or no training: the value with its 95% interval over items). Comparisons give the mean of the "
              "per-seed differences; `seeds p`: one-sample t-test over the seeds' differences (df = seeds - 1), "
              "the test of whether the effect comes back with another training seed (with 2-3 seeds it has 1-2 degrees of "
              "freedom; n/a when every seed gave the same value); `sign`: how many seeds "
              "moved each way; `items p`: paired test over items of the seed-averaged values (exact McNemar "
              "for one seed of a 0/1 metric, else paired bootstrap), which treats the adapters as fixed. Every "
              f"p-value is also given Holm-adjusted over the whole report ({n_seed_tests} seed-level tests, "
              f"{len(comparisons)} item-level tests). Span NLL: lower is better. Every item's output (score, "
              f"extracted answer, completion) is in `{ITEMS_FILE}` (one JSON line per arm, training domain, seed, round, "
              "eval set, metric and item).", ""]

    # ---- headline: what survives Holm across seeds
    lines += ["## What survives the multiplicity correction", ""]
    sig = [c for c in comparisons if not math.isnan(c["seeds_p_holm"]) and c["seeds_p_holm"] < 0.05]
    sig_items = [c for c in comparisons if c["items_p_holm"] < 0.05]
    if sig:
        lines += [f"- {c['arm']} (trained on {c['train_domain']}) on {c['eval']} {c['metric']} vs {c['against']}: "
                  f"{c['diff']:+.4f} (seeds p={_p(c['seeds']['p'])}, Holm {_p(c['seeds_p_holm'])})" for c in sig]
    else:
        lines.append("- No difference is significant across training seeds after Holm (family-wise 5%).")
    lines += ["", f"Item-level (adapters fixed), Holm < 0.05: {len(sig_items)} of {len(comparisons)} comparisons "
              "(listed in the comparison tables).", ""]

    by_key = {(c["arm"], c["train_domain"], c["eval"], c["metric"], c["against"]): c for c in comparisons}
    paper_lines, paper_rows = _paper_table(cfg, groups, arms_info, by_key)
    lines += paper_lines

    # ---- evaluation sets: what they give away
    lines += ["## Evaluation sets", "",
              "Detectable difference: the smallest accuracy difference between two arms that a two-sided 5% test "
              "finds with 80% power on this many items (unpaired, at accuracy 0.5: the conservative figure).", "",
              "| eval set | task | n | detectable difference | gold letters | always the most common letter | chance |",
              "|---|---|---|---|---|---|---|"]
    for name, b in baselines.items():
        dd = f"{b['detectable_difference']:.3f}" if b.get("detectable_difference") else "-"
        if b["task"] == "mcq":
            letters = " ".join(f"{k}:{v}" for k, v in b["gold_letters"].items())
            lines.append(f"| {name} | mcq | {b['n']} | {dd} | {letters} | {b['constant_accuracy']:.3f} "
                         f"({b['constant_letter']}) | {b['chance']:.3f} |")
        else:
            lines.append(f"| {name} | {b['task']} | {b['n']} | {dd} | - | - | - |")
    lines.append("")

    # ---- main tables: per training domain and metric, every arm on every eval set

    def cmp_cell(c: dict | None) -> str:
        if c is None:
            return ""
        sd = c["seeds"]
        parts = [f"{c['diff']:+.4f}"]
        if sd["n"] >= 2:
            parts.append(f"seeds p={_p(sd['p'])} (Holm {_p(c['seeds_p_holm'])}), {c['sign']['positive']}+/"
                         f"{c['sign']['negative']}-")
        parts.append(f"items p={_p(c['items']['p'])} (Holm {_p(c['items_p_holm'])})")
        return "; ".join(parts)

    for dom in (d for d in cfg.domains if d.train):
        d = dom.name
        lines += [f"## Trained on `{d}` ({dom.task}: {', '.join(dom.data)})", ""]
        for metric in metrics:
            rows_here = [(arm, e.name) for arm, (cond, _, _) in arms_info.items() for e in cfg.domains
                         if (arm, None if cond == "base" else d, e.name, metric) in groups]
            if not rows_here:
                continue
            lines += [f"### {metric}", "", "| arm | eval set | mean ± sd over seeds | per seed | vs base | "
                      "vs self-distill | vs previous round |", "|---|---|---|---|---|---|---|"]
            for arm, ev in rows_here:
                cond = arms_info[arm][0]
                dk = None if cond == "base" else d
                rows = groups[(arm, dk, ev, metric)]
                tag = "" if ev == d else " (out of domain)"
                n = next(iter(rows.values()))["n"]
                cells = [cmp_cell(by_key.get((arm, dk, ev, metric, a))) for a in ("base", "self-distill", "previous round")]
                lines.append(f"| {arm} | {ev}{tag} (n={n}) | {_value_cell(rows)} | {_seed_cell(rows)} | "
                             + " | ".join(cells) + " |")
            lines.append("")

    # ---- what free generation looked like: a score can move because answers got shorter or more explicit
    acc_groups = [(k, rows) for k, rows in groups.items() if k[3] == "accuracy"
                  and all("completion" in it for r in rows.values() for it in r["items"])]
    if acc_groups:
        lines += ["## Free-generation answers", "",
                  "Per arm and eval set, averaged over seeds: accuracy, mean completion length (characters), the share "
                  "of completions that state their answer (`####`, `answer is`; the others are scored on their "
                  "last number / letter), and the accuracy within each part.", "",
                  "| arm | eval set | accuracy | mean chars | states its answer | accuracy when stated | "
                  "accuracy otherwise |", "|---|---|---|---|---|---|---|"]
        for (arm, dom, ev, _), rows in acc_groups:
            its = [it for r in rows.values() for it in r["items"]]
            stated = [it for it in its if _STATED.search(it["completion"])]
            other = [it for it in its if not _STATED.search(it["completion"])]

            def share(xs):
                return f"{sum(x['correct'] for x in xs) / len(xs):.3f} (n={len(xs)})" if xs else "-"

            lines.append(f"| {arm} | {ev} | {sum(it['correct'] for it in its) / len(its):.3f} | "
                         f"{sum(len(it['completion']) for it in its) / len(its):.0f} | {len(stated) / len(its):.2f} | "
                         f"{share(stated)} | {share(other)} |")
        lines.append("")

    # ---- rank sweep (in domain)
    ranks = sorted({r for _, r, _ in arms_info.values() if r is not None})
    sweep_plot: dict = {}
    if len(ranks) > 1:
        lines += ["## Rank sweep (in domain)", "", "Mean ± sd over training seeds (hooks-only: one value).", ""]
        for d in (d for d in cfg.domains if d.train):
            for metric in metrics:
                conds = [c for c in ("hooks-only", "spd", "spd-random", "spd-pca")
                         if any((_label_of(c, r, 1), d.name, d.name, metric) in groups for r in ranks)]
                if not conds:
                    continue
                ref = {k: groups.get(key) for k, key in (("base", ("base", None, d.name, metric)),
                                                         ("self-distill", ("self-distill", d.name, d.name, metric)))}
                lines += [f"### {d.name}, {metric}", "",
                          "| rank | " + " | ".join(conds) + " |", "|---" * (len(conds) + 1) + "|"]
                for r in ranks:
                    cells = []
                    for c in conds:
                        rows = groups.get((_label_of(c, r, 1), d.name, d.name, metric))
                        cells.append(_value_cell(rows) if rows else "")
                        if rows:
                            vals = [x["value"] for x in rows.values()]
                            sweep_plot.setdefault((d.name, metric), {}).setdefault(c, []).append((r, *_mean_sd(vals)))
                    lines.append(f"| {r} | " + " | ".join(cells) + " |")
                refs = [f"{k} {_value_cell(v)}" for k, v in ref.items() if v]
                lines += ["", "For reference: " + "; ".join(refs) + ".", ""] if refs else [""]
                sweep_plot.setdefault((d.name, metric), {})["__ref__"] = {
                    k: _mean_sd([x["value"] for x in v.values()]) for k, v in ref.items() if v}

    # ---- rounds
    if cfg.rounds > 1:
        lines += ["## Rounds (in domain)", "",
                  "Round k starts from the round k-1 model (base + its adapters merged), calibrates on it, generates "
                  "with it (and its mode) and distils a new adapter on top of it.", ""]
        for d in (d for d in cfg.domains if d.train):
            for metric in metrics:
                base = groups.get(("base", None, d.name, metric))
                lines += [f"### {d.name}, {metric}", "", "| condition | base | " + " | ".join(
                    f"round {k}" for k in range(1, cfg.rounds + 1)) + " | last round vs round 1 (seeds) |",
                          "|---" * (cfg.rounds + 3) + "|"]
                for cond in cfg.round_conditions:
                    rank = cfg.calibration.rank if cond != "self-distill" else None
                    per = [groups.get((_label_of(cond, rank, k), d.name, d.name, metric)) for k in range(1, cfg.rounds + 1)]
                    last_vs_first = compare(per[-1], per[0]) if per[-1] and per[0] else None
                    lines.append(f"| {_label_of(cond, rank, 1)} | {_value_cell(base) if base else ''} | "
                                 + " | ".join(_value_cell(p) if p else "" for p in per) + " | "
                                 + (f"{last_vs_first['diff']:+.4f} (seeds p={_p(last_vs_first['seeds']['p'])})"
                                    if last_vs_first else "") + " |")
                lines.append("")

    # ---- what each trained condition learnt from
    lines += ["## Self-generated training corpora", "",
              "Each trained arm's corpus (the generation prompts answered greedily by its starting model with its mode, "
              "or none for self-distill), scored against the gold answers; top answer: the most common extracted "
              "answer and its share. A greedy corpus does not depend on the training seed, so one corpus serves "
              "every seed; `seed` is the seed a corpus does depend on (spd-random: each seed draws its own "
              "subspace; round 2: the round-1 model it was generated by).", "",
              "| domain | arm | seed | corpus accuracy | top answer (share) | completion tokens |",
              "|---|---|---|---|---|---|"]
    for c in corpora:
        top = "n/a" if c["top_answer_share"] is None else f"{c['top_answer']} ({c['top_answer_share']:.2f})"
        lines.append(f"| {c['domain']} | {c['arm']} | {c['seed'] if c['seed'] is not None else '-'} | "
                     f"{c['value']:.3f} [{c['ci_low']:.3f}, {c['ci_high']:.3f}] (n={c['n']}) | {top} | "
                     f"{c['completion_tokens']} |")
    lines += ["", "### Training budget", "",
              f"Every trained arm: {cfg.distill.steps} optimiser steps" if cfg.distill.steps else
              f"Every trained arm: {cfg.distill.epochs} epochs (steps follow the corpus size)",
              "", "| domain | arm | seeds | examples | steps | supervised tokens in the corpus | tokens trained on "
              "(all steps) | loss first -> last (mean over seeds) | seconds per seed |", "|---|---|---|---|---|---|---|---|---|"]
    tr: dict[tuple, list[dict]] = {}
    for t in training:
        tr.setdefault((t["domain"], t["arm"]), []).append(t)
    for (dom, arm), ts in tr.items():
        def vals(k):
            v = sorted({t[k] for t in ts})
            return ", ".join(map(str, v))
        lines.append(f"| {dom} | {arm} | {len(ts)} | {vals('examples')} | {vals('steps')} | {vals('corpus_tokens')} | "
                     f"{vals('trained_tokens')} | {sum(t['first_loss'] for t in ts) / len(ts):.3f} -> "
                     f"{sum(t['last_loss'] for t in ts) / len(ts):.3f} | {sum(t['seconds'] for t in ts) / len(ts):.0f} |")
    rebuilt = [t for t in training if t.get("rebuilt_last_loss")]
    if rebuilt:
        worst = max(abs(x - t["last_loss"]) / abs(t["last_loss"]) for t in rebuilt for x in t["rebuilt_last_loss"])
        lines += ["", f"Adapters trained again (the committed cache keeps no adapters): {len(rebuilt)} of {len(training)}. "
                  f"Their last loss differs from the first training's by at most {worst:.1e} (relative): the same "
                  "computation, rounded differently on another CPU, not bit for bit the same adapter. Evaluations "
                  "computed after a rebuild used the rebuilt adapter; the table gives the first training's record."]
    lines.append("")

    # ---- subspaces: spectra, the energy each rank keeps, principal angles
    names = set(store.names())
    packs = {n: store.load(n) for n in sorted(names) if "-gradient-" in n or "-activation-pca-" in n}
    main = cfg.calibration.rank
    lines += ["## Capability subspaces", "",
              "Gradient subspaces (and the centred activation-PCA ones): spectrum per site, the participation ratio "
              "of its eigenvalues, and the share of the spectrum's energy each rank keeps.", ""]
    all_ranks = sorted({main, *(cfg.calibration.ranks or [])})
    lines += ["| subspace | site | participation ratio | " + " | ".join(f"energy r{r}" for r in all_ranks) + " |",
              "|---" * (len(all_ranks) + 3) + "|"]
    spectra_packs = []
    for n, p in packs.items():
        if not n.endswith(f"-r{main}") and f"-r{main}-round" not in n:
            continue
        spectra_packs.append(p)
        for site, spectra in sorted(p.spectra.items()):
            s = spectra[0].double()
            tot = float((s**2).sum())
            energies = [float((s[:r] ** 2).sum()) / tot if tot > 0 else float("nan") for r in all_ranks]
            lines.append(f"| {p.name} | {site[0]}.{site[1]} | {participation_ratio(s):.2f} | "
                         + " | ".join(f"{e:.3f}" for e in energies) + " |")
    angles: dict[str, dict] = {}
    grads = [p for p in spectra_packs if "-gradient-" in p.name]
    for i, a in enumerate(grads):
        for b in grads[i + 1:]:
            angles[f"{a.name} vs {b.name}"] = principal_angles(a, b)
    for p in grads:
        pca = packs.get(p.name.replace("-gradient-", "-activation-pca-"))
        if pca is not None:
            angles[f"{p.name} vs {pca.name}"] = principal_angles(p, pca)
    if angles:
        lines += ["", "Principal angles between subspaces of the main rank (degrees; 0 = shared direction, "
                  "90 = orthogonal):", "", "| pair | site | min | mean | max |", "|---|---|---|---|---|"]
        for pair, sites in angles.items():
            for site, v in sites.items():
                lines.append(f"| {pair} | {site} | {min(v):.1f} | {sum(v) / len(v):.1f} | {max(v):.1f} |")
    plots = _plots(root, spectra_packs, angles, sweep_plot, paper_rows)
    lines += [""] + [f"![{p}]({p}.png)" for p in plots] + [""]
    if not plots:
        lines += ["(Plots skipped: matplotlib is not installed.)", ""]

    # ---- cost: a cached stage keeps the wall time it took when it was computed (in an earlier run)
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
        "evaluations": {"done": len(results), "planned": planned},
        "python": sys.version.split()[0], "eval_sets": baselines,
        "results": [{k: v for k, v in r.items() if k != "items"} for r in results], "comparisons": comparisons,
        "corpora": corpora, "training": training, "angles": angles, "timings": timings, "paper_table": paper_rows,
    })
    write_items(root / ITEMS_FILE, results)


def write_items(path: Path, results: list[dict]) -> None:
    """Every per-item output, one JSON line per arm x training domain x seed x round x eval set x metric
    x item (its id, score, extracted answer and completion), committed beside the report so each
    number in it can be recomputed. gzip with no timestamp: the same results give the same bytes."""
    lines = []
    for r in results:
        head = {k: r[k] for k in ("arm", "train_domain", "seed", "round", "eval", "metric")}
        lines += [json.dumps({**head, **it}, ensure_ascii=False) for it in r["items"]]
    write_bytes(path, gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0))


def _gain(c: dict | None, metric: str, ref: float | None) -> dict | None:
    """A comparison as a gain (positive = better, whichever way the metric runs): absolute, with the 95%
    t-interval over training seeds, and relative to the reference arm's mean."""
    if c is None:
        return None
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    sd = c["seeds"]
    lo, hi = (sign * sd["ci_low"], sign * sd["ci_high"]) if "ci_low" in sd else (float("nan"), float("nan"))
    gain = sign * c["diff"]
    return {"gain": gain, "ci_low": min(lo, hi), "ci_high": max(lo, hi), "seeds": sd["n"],
            "relative": gain / ref if ref else float("nan"), "seeds_p": sd["p"], "seeds_p_holm": c["seeds_p_holm"],
            "positive": c["sign"]["positive"], "negative": c["sign"]["negative"]}


def _paper_table(cfg, groups: dict, arms_info: dict, by_key: dict) -> tuple[list[str], list[dict]]:
    """The paper's layout: condition x (trained on, evaluated on), in and out of domain, on each eval set's
    headline score; then SPD's gains over self-distillation and over the base model beside the paper's claims."""
    sets = {d.name: m for d in cfg.domains if (m := next((m for m in HEADLINE if m in (d.metrics or cfg.metrics)
                                                            and (m != "letter-accuracy" or d.task == "mcq")), None))}
    trained = [d.name for d in cfg.domains if d.train and d.name in sets]
    cols = [(d, e) for d in trained for e in [d] + [x for x in sets if x != d]]
    mean = lambda rows: sum(r["value"] for r in rows.values()) / len(rows)  # noqa: E731
    lines = ["## The paper's table", "",
             "Each eval set's headline score (" + ", ".join(f"{e}: {m}" for e, m in sets.items()) + "), mean over "
             "training seeds. A column is a training domain and an eval set: in domain when they are the same, "
             "else out of domain (the base model and hooks-only are not trained; hooks-only serves the training "
             "domain's mode). Span NLL: lower is better.", "",
             "| condition | " + " | ".join(f"{d} -> {e} ({'in' if d == e else 'out'})" for d, e in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    labels = [a for a, (_, _, rnd) in arms_info.items() if rnd == 1]
    for arm in labels:
        cells = []
        for d, e in cols:
            rows = groups.get((arm, None if arm == "base" else d, e, sets[e]))
            cells.append(f"{mean(rows):.3f}" if rows else "")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    out: list[dict] = []
    for arm in (a for a in labels if arms_info[a][0] == "spd"):
        for d, e in cols:
            m = sets[e]
            for against, claim in (("self-distill", "over self-distill"), ("base", "over base")):
                if d != e and against == "self-distill":
                    continue
                ref_rows = groups.get(("base", None, e, m) if against == "base" else ("self-distill", d, e, m))
                g = _gain(by_key.get((arm, d, e, m, against)), m, mean(ref_rows) if ref_rows else None)
                if g is not None:
                    out.append({"arm": arm, "train_domain": d, "eval": e, "metric": m, "against": against,
                                "claim": claim if d == e else "out of domain", **g})
    lines += ["", "### SPD's gains beside the paper's claims", "",
              "Gain: positive = better (span NLL: a lower NLL), in the score's own units, with its 95% t-interval "
              "over training seeds (n/a when the seeds agree exactly), and relative to the reference arm's mean. "
              "`seeds p`: the one-sample t-test over seeds (Holm over the whole report).", "",
              "| claim | paper | arm | trained on -> eval set | metric | gain [95% CI over seeds] | relative | "
              "seeds p (Holm) | seeds +/- |", "|---|---|---|---|---|---|---|---|---|"]
    for g in sorted(out, key=lambda g: list(PAPER).index(g["claim"])):
        ci = "n/a" if math.isnan(g["ci_low"]) else f"[{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]"
        rel = "n/a" if math.isnan(g["relative"]) else f"{100 * g['relative']:+.1f}%"
        lines.append(f"| {g['claim']} | {PAPER[g['claim']]} | {g['arm']} | {g['train_domain']} -> {g['eval']} | "
                     f"{g['metric']} | {g['gain']:+.3f} {ci} | {rel} | {_p(g['seeds_p'])} ({_p(g['seeds_p_holm'])}) "
                     f"| {g['positive']}+/{g['negative']}- |")
    # every condition's relative gain over the base model, in domain against out of domain (the plot)
    for arm in labels:
        cond = arms_info[arm][0]
        if cond == "base":
            continue
        for d, e in cols:
            if d == e:
                continue
            gi = _rel_gain(by_key.get((arm, d, d, sets[d], "base")), sets[d], groups.get(("base", None, d, sets[d])))
            go = _rel_gain(by_key.get((arm, d, e, sets[e], "base")), sets[e], groups.get(("base", None, e, sets[e])))
            if gi is not None and go is not None:
                out.append({"arm": arm, "train_domain": d, "eval": e, "claim": "plot", "in_domain_relative": gi,
                            "out_of_domain_relative": go})
    return lines + [""], out


def _rel_gain(c: dict | None, metric: str, base_rows: dict | None) -> float | None:
    if c is None or not base_rows:
        return None
    ref = sum(r["value"] for r in base_rows.values()) / len(base_rows)
    return (-c["diff"] if metric in LOWER_IS_BETTER else c["diff"]) / ref if ref else None


def _plots(root: Path, packs, angles, sweep, paper_rows) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for p in packs:
        for site, spectra in sorted(p.spectra.items()):
            s = spectra[0].double()
            ax.semilogy((s**2 / (s**2).sum()).numpy(), label=f"{p.name} {site[0]}.{site[1]}")
    _labels(ax, "eigen-direction", "share of energy")
    _save(fig, root / "spectra.png")
    made.append("spectra")
    if angles:
        fig, ax = plt.subplots(figsize=(7, 4))
        for pair, sites in angles.items():
            for site, v in sites.items():
                ax.plot(v, label=f"{pair} {site}")
        _labels(ax, "principal angle index", "degrees")
        _save(fig, root / "angles.png")
        made.append("angles")
    panels = [(k, v) for k, v in sweep.items() if any(c != "__ref__" for c in v)]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
        for ax, ((dom, metric), series) in zip(axes[0], panels):
            for cond, pts in series.items():
                if cond == "__ref__":
                    continue
                pts = sorted(pts)
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                            yerr=[0 if math.isnan(p[2]) else p[2] for p in pts], marker="o", capsize=3, label=cond)
            for i, (name, (m, _)) in enumerate(series.get("__ref__", {}).items()):
                ax.axhline(m, linestyle="--", color=f"C{7 + i}", label=name)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{dom}: {metric}", fontsize=9)
            _labels(ax, "subspace rank", metric, legend=6)
        _save(fig, root / "ranks.png")
        made.append("ranks")
    pts = [g for g in paper_rows if g["claim"] == "plot"]
    if pts:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        arms = list(dict.fromkeys(g["arm"] for g in pts))
        sets = list(dict.fromkeys((g["train_domain"], g["eval"]) for g in pts))
        for i, arm in enumerate(arms):
            for j, (d, e) in enumerate(sets):
                xy = [(100 * g["in_domain_relative"], 100 * g["out_of_domain_relative"]) for g in pts
                      if g["arm"] == arm and (g["train_domain"], g["eval"]) == (d, e)]
                if xy:
                    ax.scatter(*zip(*xy), color=f"C{i}", marker="osD^v<>"[j % 7], label=f"{arm}: {d} -> {e}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.axvline(0, color="grey", lw=0.8)
        _labels(ax, "in-domain gain over base, % of base", "out-of-domain gain over base, % of base")
        _save(fig, root / "transfer.png")
        made.append("transfer")
    return made


def _labels(ax, x: str, y: str, legend: int = 5) -> None:
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.legend(fontsize=legend)


def _save(fig, path: Path) -> None:
    """Lay the figure out and write it as PNG."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_bytes(path, buf.getvalue())
