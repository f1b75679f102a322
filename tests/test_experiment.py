"""End to end: the experiment runner on the tiny config produces a complete report, and a rerun is
served entirely from the stage cache."""
import gzip
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from spd_engine.experiment import CONDITIONS, load_config, run_experiment, split

pytestmark = pytest.mark.slow
TINY = Path(__file__).resolve().parent.parent / "experiments" / "tiny.toml"


def test_splits_are_disjoint_and_reproducible():
    cfg = load_config(TINY)
    for d in cfg.domains:
        a, b = split(d, 42), split(d, 42)
        ids = [[x.id for x in a[k]] for k in ("calibration", "generation", "evaluation")]
        assert ids == [[x.id for x in b[k]] for k in ("calibration", "generation", "evaluation")]
        assert len(set(sum(ids, []))) == sum(map(len, ids))


def test_bad_config_is_refused_naming_the_field(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY.read_text().replace('task = "math"', 'task = "maths"'))
    with pytest.raises(ValueError, match="domains.0.task"):
        load_config(bad)
    # the key's deprecated name still loads, with a warning; both names at once is refused
    old = tmp_path / "old.toml"
    old.write_text(TINY.read_text().replace('task = "', 'kind = "'))
    with pytest.warns(FutureWarning, match="`kind` is deprecated"):
        assert [d.task for d in load_config(old).domains] == [d.task for d in load_config(TINY).domains]
    bad.write_text(TINY.read_text().replace('task = "math"', 'task = "math"\nkind = "math"'))
    with pytest.raises(ValueError, match="give `task` only"):
        load_config(bad)
    bad.write_text(TINY.read_text() + "\nunknown_key = 1\n")
    with pytest.raises(ValueError, match="unknown_key"):
        load_config(bad)


def test_tiny_experiment_runs_every_condition_and_resumes_from_cache(tmp_path):
    root = run_experiment(TINY, tmp_path)
    report = json.loads((root / "report.json").read_text())
    conds = {(r["condition"], r["eval"], r["metric"]) for r in report["results"]}
    for c in CONDITIONS:
        for e in ("math", "mcq"):
            for m in ("accuracy", "span-nll"):
                assert (c, e, m) in conds
        assert (c, "mcq", "letter-accuracy") in conds and (c, "math", "letter-accuracy") not in conds
    assert "math-gradient-r8 vs mcq-gradient-r8" in report["angles"]
    assert report["eval_sets"]["mcq"]["n"] == 3 and 0 < report["eval_sets"]["mcq"]["constant_accuracy"] <= 1
    trained = [c for c in CONDITIONS if c not in ("base", "hooks-only")]
    assert [(c["domain"], c["condition"]) for c in report["corpora"]] == [(d, c) for d in ("math", "mcq") for c in trained]
    assert all(c["n"] == 3 and 0 <= c["value"] <= 1 and 0 < c["top_answer_share"] <= 1 for c in report["corpora"])
    assert all(t["trained_tokens"] > 0 for t in report["training"])
    # every number is recomputable from the committed per-item outputs
    items = [json.loads(line) for line in gzip.decompress((root / "items.jsonl.gz").read_bytes()).splitlines()]
    assert len(items) == sum(r["n"] for r in report["results"])
    for r in report["results"]:
        key = ("arm", "train_domain", "seed", "round", "eval", "metric")
        mine = [it for it in items if all(it[k] == r[k] for k in key)]
        vals = [it["span_nll"] if r["metric"] == "span-nll" else float(it["correct"]) for it in mine]
        assert len(mine) == r["n"] and sum(vals) / len(vals) == pytest.approx(r["value"])
    md = (root / "report.md").read_text()
    assert "vs self-distill" in md and "(out of domain)" in md and "Self-generated training corpora" in md
    assert "Holm" in md and "Training budget" in md
    if importlib.util.find_spec("matplotlib"):
        assert (root / "spectra.png").stat().st_size > 0 and (root / "angles.png").stat().st_size > 0
    # interrupted run: drop the report and one evaluation; the rerun recomputes only that stage
    (root / "report.md").unlink()
    evals = sorted((root / "cache").glob("evaluate-*"))
    shutil.rmtree(evals[0])
    run_experiment(TINY, tmp_path)
    rerun = json.loads((root / "report.json").read_text())["timings"]
    assert [t["stage"] for t in rerun if not t["cached"]] == ["evaluate"]
    # the results folder moved elsewhere: every stage is still found in its cache
    moved = tmp_path / "moved"
    shutil.move(root, moved / root.name)
    run_experiment(TINY, moved)
    assert not [t for t in json.loads((moved / root.name / "report.json").read_text())["timings"] if not t["cached"]]
    # a committed cache (its adapters are not committed): nothing trains again while every evaluation
    # is cached; dropping one trained arm's evaluation trains that arm again, to the same answers
    cache = moved / root.name / "cache"
    adapters = sorted(cache.glob("distill-*/adapter"))
    assert len(adapters) == len(report["training"])
    for a in adapters:
        shutil.rmtree(a)
    run_experiment(TINY, moved)
    assert not [t for t in json.loads((moved / root.name / "report.json").read_text())["timings"] if not t["cached"]]
    trained_eval = next(d for d in sorted(cache.glob("evaluate-*"))
                        if json.loads((d / "done.json").read_text())["key"]["adapter"] is not None)
    before = json.loads((trained_eval / "done.json").read_text())["items"]
    records = {d: json.loads((d / "done.json").read_text()) for d in cache.glob("distill-*")}
    shutil.rmtree(trained_eval)
    run_experiment(TINY, moved)
    rerun = json.loads((moved / root.name / "report.json").read_text())
    assert [t["stage"] for t in rerun["timings"] if not t["cached"]] == ["distill", "evaluate"]
    assert json.loads((trained_eval / "done.json").read_text())["items"] == before
    # the retrained arm keeps its first training record, and the rebuild is recorded beside it
    after = {d: json.loads((d / "done.json").read_text()) for d in records}
    (changed,) = [d for d in records if after[d] != records[d]]
    assert {k: v for k, v in after[changed].items() if k != "rebuilt"} == records[changed]
    assert len(after[changed]["rebuilt"]) == 1 and "train" in after[changed]["rebuilt"][0]
    assert sum(bool(t["rebuilt_last_loss"]) for t in rerun["training"]) == 1
    assert "Adapters trained again" in (moved / root.name / "report.md").read_text()
