"""What the experiment's numbers measure: answer extraction, the letter-restricted multiple-choice
score, code programs with the prompt's preamble, fixed answer formats, centred activation PCA, the
statistics across seeds and the Holm correction, the training budget, and the stage cache keys."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from spd_engine.data import load_examples, resolve_data
from spd_engine.stats import (
    detectable_difference,
    holm,
    one_sample_t,
    paired_bootstrap,
    sign_test,
    t_quantile,
    t_two_sided_p,
)
from spd_engine.tasks import (
    MCQ_ANSWER_PREFIX,
    Example,
    code_program,
    correctness_span,
    extract,
    score,
    with_answer_format,
)

# ---------------------------------------------------------------- multiple choice: free-form extraction


@pytest.mark.parametrize("completion, want", [
    ("I think (C)", "C"),                                   # a sentence-initial "I" is not a letter
    ("A date 10 days ago was 12/04/2026, so (B).", "B"),    # nor a sentence-initial "A"
    ("A date 10 days ago was 12/04/2026.", None),
    ("The correct option is D.", "D"),
    ("The answer is (E) because ...", "E"),
    ("Answer: C", "C"),
    ("(A) 01/02/2020", "A"),
    ("B.\nBecause ...", "B"),
    ("C", "C"),
    ("All of them", None),
])
def test_mcq_extraction_reads_the_stated_letter(completion: str, want: str | None) -> None:
    assert extract("mcq", completion, 6) == want


def test_mcq_extraction_ignores_letters_beyond_the_options() -> None:
    assert extract("mcq", "The answer is (G).", 6) is None
    assert extract("mcq", "(G) is not an option, so (B)", 6) == "B"
    ex = Example(id="q", prompt="p", answer="B", options=("x", "y", "z"))
    assert not score("mcq", ex, "The answer is (D).")  # only 3 options: D is no answer at all
    assert score("mcq", ex, "The answer is (D)... no: (B).")


# ---------------------------------------------------------------- fixed answer formats


def test_gold_answers_get_a_fixed_format_and_the_span_is_the_answer_alone() -> None:
    ex = with_answer_format("mcq", Example(id="q", prompt="p", answer="B", options=("x", "y")))
    assert ex.answer == f"{MCQ_ANSWER_PREFIX}B)" and ex.answer[slice(*correctness_span("mcq", ex))] == "B"
    assert score("mcq", ex, "(B)") and not score("mcq", ex, "(A)")
    ex = with_answer_format("math", Example(id="m", prompt="What is 141 minus 906?", answer="-765"))
    assert ex.answer == "The answer is -765." and ex.answer[slice(*correctness_span("math", ex))] == "-765"
    assert score("math", ex, "141 - 906 = -765")
    gsm = Example(id="g", prompt="q", answer="6 * 3 = 18\n#### 18")
    assert with_answer_format("math", gsm) == gsm  # reasoning answers stay as they are


def test_bigbench_arithmetic_examples_keep_scoring_after_formatting() -> None:
    for ex in load_examples(resolve_data("bigbench/arithmetic/1_digit_addition"), "math", limit=10):
        f = with_answer_format("math", ex)
        assert score("math", f, f"so it is {ex.answer}") and f.answer.startswith("The answer is ")


# ---------------------------------------------------------------- code: the prompt's preamble


def test_code_completion_that_redefines_the_entry_point_gets_the_prompts_imports() -> None:
    [ex] = [e for e in load_examples("humaneval", "code") if e.id == "HumanEval/6"]
    body = ex.answer[len(ex.prompt):]
    # the whole function, as a chat model writes it, without the prompt's `from typing import List`
    signature = "def parse_nested_parens(paren_string: str) -> List[int]:\n"
    completion = f"Here it is:\n```python\n{signature}{body}```"
    assert "from typing import List" not in completion
    program = code_program(ex, extract("code", completion))
    assert program.startswith("from typing import List")
    assert score("code", ex, completion)
    assert not score("code", ex, f"```python\n{signature}    return []\n```")


def test_code_completion_keeps_the_prompts_helpers() -> None:
    [ex] = [e for e in load_examples("humaneval", "code") if e.id == "HumanEval/10"]
    solution = "def make_palindrome(string: str) -> str:\n" + ex.answer[len(ex.prompt):]
    assert "def is_palindrome" not in solution  # the helper lives in the prompt only
    assert "def is_palindrome" in code_program(ex, solution)
    assert score("code", ex, f"```python\n{solution}```")


# ---------------------------------------------------------------- statistics


def test_t_distribution_p_values_match_tables() -> None:
    assert t_two_sided_p(12.706, 1) == pytest.approx(0.05, abs=1e-3)
    assert t_two_sided_p(4.303, 2) == pytest.approx(0.05, abs=1e-3)
    assert t_two_sided_p(2.228, 10) == pytest.approx(0.05, abs=1e-3)
    assert t_two_sided_p(0.0, 5) == pytest.approx(1.0)
    r = one_sample_t([0.01, 0.012, 0.011])
    assert r["n"] == 3 and r["p"] < 0.01
    assert one_sample_t([0.01, -0.01, 0.0])["p"] == pytest.approx(1.0)
    assert math.isnan(one_sample_t([0.3])["p"])  # one seed: no test across seeds
    assert math.isnan(one_sample_t([0.6, 0.6])["p"])  # no spread across seeds: undefined, not p = 0
    assert t_quantile(0.95, 2) == pytest.approx(4.303, abs=1e-3) and t_quantile(0.95, 10) == pytest.approx(2.228, abs=1e-3)
    r = one_sample_t([0.1, 0.2, 0.15])  # mean 0.15, sd 0.05: 0.15 +- 4.303 * 0.05 / sqrt(3)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((0.15 - 0.1242, 0.15 + 0.1242), abs=1e-4)


def test_detectable_difference_is_the_textbook_sample_size() -> None:
    # two proportions at 0.5, 5% two-sided, 80% power: about 392 items per arm for 10 points
    assert detectable_difference(392) == pytest.approx(0.10, abs=1e-3)
    assert detectable_difference(50) > 0.25 > detectable_difference(100)


def test_sign_test_over_three_seeds_cannot_reach_significance() -> None:
    assert sign_test([1, 2, 3])["p"] == pytest.approx(0.25)
    assert sign_test([1, -2, 3])["p"] == pytest.approx(1.0)


def test_paired_bootstrap_counts_tied_resamples_on_both_sides() -> None:
    # two discordant 0/1 items in 400, both one way: most resampled means are exactly 0, so the
    # two-sided p is about 2 * e^-2, not 0 (what counting the ties on one side only gave)
    a, b = [0.0, 0.0] + [1.0] * 398, [1.0] * 400
    r = paired_bootstrap(a, b)
    assert r["diff"] == pytest.approx(-0.005) and 0.15 < r["p"] < 0.45
    assert paired_bootstrap([0.0] * 100 + [1.0] * 300, b)["p"] < 0.001  # 100 of 400 one way: still decisive
    assert paired_bootstrap(b, b)["p"] == 1.0


def test_holm_adjustment() -> None:
    assert holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    out = holm([0.01, float("nan"), 0.02])
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)


def test_seed_level_comparison_against_an_untrained_and_a_seeded_arm() -> None:
    from spd_engine.experiment_report import compare

    def row(seed, vals):
        items = [{"id": str(i), "span_nll": v} for i, v in enumerate(vals)]
        return {"seed": seed, "metric": "span-nll", "value": sum(vals) / len(vals), "items": items}

    base = {None: row(None, [1.0, 2.0, 3.0])}
    arm = {s: row(s, [1.0 - d, 2.0 - d, 3.0 - d]) for s, d in ((1, 0.1), (2, 0.12), (3, 0.11))}
    c = compare(arm, base)
    assert c["seed_diffs"] == pytest.approx([-0.1, -0.12, -0.11]) and c["seeds"]["p"] < 0.01
    assert c["sign"]["negative"] == 3
    other = {s: row(s, [1.0, 2.0, 3.0 + d]) for s, d in ((1, 0.3), (2, -0.3), (4, 0.0))}
    c = compare(arm, other)  # paired by seed: only seeds 1 and 2 are shared
    assert len(c["seed_diffs"]) == 2


# ---------------------------------------------------------------- model-level (tiny random Llama)


def test_letter_accuracy_scores_every_option_letter_after_the_fixed_prefix(tiny_path) -> None:
    from spd_engine.evaluate import letter_accuracy, letter_candidates, span_nll_eval
    from spd_engine.hf_backend import HFBackend

    backend = HFBackend(str(tiny_path))
    examples = [with_answer_format("mcq", ex)
                for ex in load_examples(resolve_data("bigbench/date_understanding"), "mcq", limit=3)]
    shared = letter_candidates(backend.tokenizer, examples[0])
    assert isinstance(shared, tuple) and len(shared[2]) == len(examples[0].options)
    r = letter_accuracy(backend, examples)
    for ex, it in zip(examples, r.items):
        assert set(it["letter_logprobs"]) == {chr(65 + i) for i in range(len(ex.options))}
        assert it["answer"] == max(it["letter_logprobs"], key=it["letter_logprobs"].get)
        assert it["correct"] == (it["answer"] == it["gold"])
    # the span NLL of the gold letter is its letter log-likelihood after the same prefix
    nll = span_nll_eval(backend, "mcq", examples)
    for it, n in zip(r.items, nll.items):
        assert -it["letter_logprobs"][it["gold"]] == pytest.approx(n["span_nll"], abs=1e-4)


def test_activation_pca_is_centred(tiny_path) -> None:
    from spd_engine import models
    from spd_engine.calibrate import CalibrationConfig, calibrate, site_rows, batches

    info = models.info(Path(tiny_path))
    model, tok = models.load(Path(tiny_path))
    examples = load_examples(resolve_data("gsm8k"), "math", limit=4)
    pack = calibrate(model, tok, info, "math", examples, "p", CalibrationConfig(method="activation-pca", rank=4, layers=[1]))
    rows = []
    for ids, mask, spans in batches(tok, "math", examples, 4):
        rows.append(site_rows(model, ids, mask, spans, [(1, "k")], "activation-pca")[(1, "k")])
    x = torch.cat(rows).double()
    xc = x - x.mean(0)
    want = torch.linalg.eigh(xc.T @ xc).eigenvectors[:, -4:]
    got = pack.bases[(1, "k")][0].double()
    # the same subspace as the eigenvectors of the centred scatter matrix (all principal angles ~0)
    assert torch.linalg.svdvals(want.T @ got).min() > 0.999


def test_distill_with_fixed_steps_counts_its_tokens(tiny_path, tmp_path) -> None:
    from spd_engine import models
    from spd_engine.distill import DistillConfig, distill

    model, tok = models.load(Path(tiny_path))
    rows = [{"prompt": f"q{i}", "completion": "a b c " * (i + 1), "finish_reason": "stop"} for i in range(3)]
    rep = distill(model, tok, rows, tmp_path / "a", DistillConfig(steps=5, batch_size=2, epochs=1))
    assert rep["steps"] == 5 and rep["epochs_seen"] == 2.5
    assert rep["trained_tokens"] > rep["corpus_tokens"] > 0


def _tiny_llama_config(tmp_path: Path, tiny_path: Path, **extra) -> Path:
    lines = ['name = "seeds"', f'model = "{tiny_path}"', "seed = 1", "seeds = [1, 2]", "batch_size = 4",
             'metrics = ["span-nll", "letter-accuracy"]', 'conditions = ["base", "hooks-only", "self-distill", "spd", "spd-random"]',
             "rounds = 2", 'round_conditions = ["self-distill", "spd"]']
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    lines += ["", "[[domains]]", 'name = "mcq"', 'task = "mcq"', 'data = ["bigbench/date_understanding"]',
              "calibration = 3", "generation = 3", "evaluation = 4", "max_tokens = 4",
              "", "[[domains]]", 'name = "nav"', 'task = "mcq"', 'data = ["bigbench/navigate"]', "train = false",
              "evaluation = 3", "max_tokens = 4",
              "", "[calibration]", "layers = [1]", "rank = 4", "ranks = [2, 4]", 'sweep = ["spd"]',
              "", "[distill]", "steps = 2", "batch_size = 2", "lr = 1e-3"]
    path = tmp_path / "seeds.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_experiment_with_seeds_rank_sweep_and_two_rounds(tiny_path, tmp_path, monkeypatch) -> None:
    from spd_engine.experiment import arms, load_config, run_experiment

    config = _tiny_llama_config(tmp_path, tiny_path)
    cfg = load_config(config)
    labels = sorted({a.label for a in arms(cfg)})
    assert labels == sorted(["base", "hooks-only r4", "self-distill", "spd r4", "spd r2", "spd-random r4",
                             "self-distill round 2", "spd r4 round 2"])
    root = run_experiment(config, tmp_path / "out")
    report = json.loads((root / "report.json").read_text())
    res = report["results"]
    seeds = lambda arm: sorted(r["seed"] for r in res if r["arm"] == arm and r["metric"] == "span-nll"  # noqa: E731
                               and r["eval"] == "mcq")
    assert seeds("spd r2") == [1, 2] and seeds("spd r4 round 2") == [1, 2] and seeds("base") == [None]
    assert {r["metric"] for r in res} == {"span-nll", "letter-accuracy"}
    # the evaluation-only domain: no arms of its own, out of domain for every trained arm
    assert not [a for a in arms(cfg) if a.domain == "nav"]
    nav = [r for r in res if r["eval"] == "nav"]
    assert {r["arm"] for r in nav} == {r["arm"] for r in res} and not any(r["in_domain"] and r["train_domain"] for r in nav)
    comps = report["comparisons"]
    c = next(c for c in comps if c["arm"] == "spd r4" and c["against"] == "base" and c["metric"] == "span-nll")
    assert len(c["seed_diffs"]) == 2 and "seeds_p_holm" in c and "items_p_holm" in c
    assert any(c["arm"] == "spd r4 round 2" and c["against"] == "previous round" for c in comps)
    # one corpus per greedy mode, one per seed for the random subspace
    assert sum(c["arm"] == "spd-random r4" for c in report["corpora"]) == 2
    assert sum(c["arm"] == "spd r4" for c in report["corpora"]) == 1
    assert all(t["steps"] == 2 and t["trained_tokens"] > 0 for t in report["training"])
    # round 2 made its own gradient subspace, on the round-1 model of each seed
    assert any(n.endswith("round2") for n in (p.name for p in (root / "subspaces").iterdir()))
    md = (root / "report.md").read_text()
    for part in ("Rank sweep", "Rounds (in domain)", "Holm", "Training budget", "always the most common letter",
                 "The paper's table", "mcq -> nav (out)", "beside the paper's claims"):
        assert part in md
    # the paper's claims, checked: spd's gains in and out of domain, each from the report's own comparisons
    gains = [g for g in report["paper_table"] if g["claim"] != "plot"]
    assert {g["claim"] for g in gains} == {"over self-distill", "over base", "out of domain"}
    g = next(g for g in gains if g["arm"] == "spd r4" and g["claim"] == "over base")
    c = next(c for c in comps if c["arm"] == "spd r4" and c["against"] == "base" and c["metric"] == "letter-accuracy"
             and c["eval"] == "mcq")
    assert g["gain"] == pytest.approx(c["diff"]) and g["seeds"] == 2
    assert any(g["claim"] == "plot" and g["eval"] == "nav" for g in report["paper_table"])
    # a change upstream (generation length) recomputes the corpora, adapters and every evaluation that
    # depends on them - and nothing that does not (calibrations, the base model's evaluations)
    config.write_text(config.read_text().replace("max_tokens = 4", "max_tokens = 5"))
    run_experiment(config, tmp_path / "out")
    timings = json.loads((root / "report.json").read_text())["timings"]
    fresh = {}
    for t in timings:
        fresh[t["stage"], t["cached"]] = fresh.get((t["stage"], t["cached"]), 0) + 1
    assert not fresh.get(("generate", True)) and not fresh.get(("distill", True))
    # round 1's four modes (gradient r4 and r2, random r4 per seed) are kept; round 2's two are new (new models)
    assert fresh[("calibrate", True)] == 4 and fresh[("calibrate", False)] == 2
    assert fresh[("evaluate", True)] == 8  # base and hooks-only (2 metrics each, 2 eval sets)
    # a run still under way: the cached-only report loads no model, computes nothing, refills the
    # results' store from the cache, and reports the cached evaluations unchanged, saying how many are missing
    full = json.loads((root / "report.json").read_text())
    assert full["evaluations"]["done"] == full["evaluations"]["planned"] == len(full["results"])
    packs = sorted(p.name for p in (root / "subspaces").iterdir())
    shutil.rmtree(root / "subspaces")
    shutil.rmtree(sorted((root / "cache").glob("generate-*"))[0])
    monkeypatch.setattr("spd_engine.experiment.HFBackend", None)
    run_experiment(config, tmp_path / "out", cached_only=True)
    part = json.loads((root / "report.json").read_text())
    assert all(t["cached"] for t in part["timings"])
    done, planned = part["evaluations"]["done"], part["evaluations"]["planned"]
    assert 0 < done < planned == full["evaluations"]["planned"] and done == len(part["results"])
    key = lambda r: (r["arm"], r["train_domain"], r["seed"], r["eval"], r["metric"])  # noqa: E731
    assert {key(r): r["value"] for r in part["results"]}.items() <= {key(r): r["value"] for r in full["results"]}.items()
    assert f"Partial: {done} of the {planned} planned evaluations" in (root / "report.md").read_text()
    assert sorted(p.name for p in (root / "subspaces").iterdir()) == packs
