"""End to end: the `spd` CLI runs calibrate -> generate -> distill -> eval on the bundled model
and real GSM8K items, and the adapter it writes loads in plain peft."""
import json
import re
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow


def spd(*args, env=None):
    proc = subprocess.run([sys.executable, "-m", "spd_engine.cli", *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def test_calibrate_generate_distill_eval_pipeline(tmp_path, bundled_path):
    store = str(tmp_path / "store")
    cal = spd("calibrate", "--data", "gsm8k", "--task", "math", "--limit", "4", "--name", "cli-math",
              "--rank", "8", "--store", store)
    assert cal["ranks"] == {"15.k": [8], "15.v": [8], "29.k": [8], "29.v": [8]}

    listing = subprocess.run([sys.executable, "-m", "spd_engine.cli", "mode", "ls", "--store", store],
                             capture_output=True, text=True, check=True).stdout
    assert "cli-math" in listing
    shown = spd("mode", "show", "cli-math", "--store", store)
    assert len(shown["spectrum"]["15.k.g0"]["singular_values"]) == 192

    corpus = tmp_path / "corpus.jsonl"
    gen = spd("generate", "--data", "gsm8k", "--task", "math", "--limit", "3", "--capability", "cli-math",
              "--max-tokens", "24", "--out", str(corpus), "--store", store)
    assert gen["written"] == 3
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    assert {r["provenance"]["capability"][0] for r in rows} == {"cli-math"}
    assert all(r["completion"] for r in rows)

    # resumable: a rerun over more prompts keeps the 3 rows and writes only the new one
    gen2 = spd("generate", "--data", "gsm8k", "--task", "math", "--limit", "4", "--capability", "cli-math",
               "--max-tokens", "24", "--out", str(corpus), "--store", store)
    assert (gen2["written"], gen2["skipped"]) == (1, 3)
    assert corpus.read_text().splitlines()[:3] == [json.dumps(r, ensure_ascii=False) for r in rows]

    adapter = tmp_path / "adapter"
    dist = spd("distill", "--corpus", str(corpus), "--out", str(adapter), "--epochs", "1", "--lr", "1e-3")
    assert dist["steps"] == 1 and (adapter / "adapter_config.json").exists()

    res = spd("eval", "--data", "gsm8k", "--task", "math", "--limit", "2", "--adapter", str(adapter),
              "--capability", "cli-math", "--max-tokens", "16", "--store", store, "--out", str(tmp_path / "ev.json"))
    assert res["n"] == 2 and 0 <= res["ci_low"] <= res["value"] <= res["ci_high"] <= 1
    nll = spd("eval", "--data", "gsm8k", "--task", "math", "--limit", "2", "--metric", "span-nll",
              "--capability", "cli-math", "--store", store)
    assert nll["metric"] == "span-nll" and nll["value"] > 0

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bundled_path), adapter)
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(b) == 30 * 4 and any(p.abs().max() > 0 for p in b)  # q/k/v/o in 30 layers, trained
    assert torch.isfinite(torch.stack([p.abs().max() for p in b])).all()


def test_cli_rejects_bad_arguments_with_a_clear_message(tmp_path):
    bad = subprocess.run([sys.executable, "-m", "spd_engine.cli", "generate", "--data", "gsm8k", "--task", "math",
                          "--strength", "1.5", "--out", str(tmp_path / "c.jsonl")], capture_output=True, text=True)
    assert bad.returncode == 2 and "--strength must be in [0, 1]" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "spd_engine.cli", "calibrate", "--data", "gsm8k", "--task", "math",
                          "--name", "../x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid subspace name" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "spd_engine.cli", "generate", "--data", str(tmp_path / "none.jsonl"),
                          "--task", "math", "--out", str(tmp_path / "c.jsonl")], capture_output=True, text=True)
    assert bad.returncode == 2 and "none.jsonl" in bad.stderr


def test_the_previous_cli_spellings_still_work_with_a_warning(tmp_path):
    """`--kind` (now `--task`) and `spd subspace` (now `spd mode`): accepted for one release, flagged."""
    import argparse

    from spd_engine import cli

    sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("calibrate", "generate", "eval"):
        sp = sub.choices[command]
        rest = ["--name", "n"] if command == "calibrate" else ["--out", "o"] if command == "generate" else []
        assert sp.parse_args(["--data", "d", "--task", "mcq", *rest]).task == "mcq"
        assert sp.parse_args(["--data", "d", "--kind", "mcq", *rest]).task == "mcq"
        assert "--task" in sp.format_help() and not re.search(r"--kind\b", sp.format_help())  # --kinds: K/V
    assert "deprecated" in cli.parser().format_help()
    store = str(tmp_path / "empty-store")
    for command, warned in (("mode", False), ("subspace", True)):
        proc = subprocess.run([sys.executable, "-m", "spd_engine.cli", command, "ls", "--store", store],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert ("spd subspace is deprecated, use spd mode" in proc.stderr) == warned, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "spd_engine.cli", "calibrate", "--data", "gsm8k", "--kind", "math",
                           "--name", "../x"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--kind is deprecated, use --task" in proc.stderr
