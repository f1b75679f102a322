"""The benchmark suite runs end to end at tiny sizes and writes JSON with every required field.
No timing thresholds: the figures themselves are not checked, only that they exist."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

REPO = Path(__file__).resolve().parent.parent
NAMES = ["hooked_generation", "projection_overhead"]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="projection_overhead needs vllm")
def test_quick_subset_writes_results(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--only", ",".join(NAMES),
                           "--out", str(tmp_path), "--threads", "1"], capture_output=True, text=True, cwd=str(REPO), timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in NAMES:
        r = json.loads((tmp_path / f"{name}.json").read_text())
        assert r["benchmark"] == name and r["quick"] is True and "error" not in r
        for key in ("machine", "model", "method", "settings", "date", "goal", "notes", "headline", "wall_seconds"):
            assert key in r, (name, key)
        m = r["machine"]
        assert m["cpu"] and m["cores"] >= 1 and m["versions"]["torch"]
        assert r["headline"]
        for h in r["headline"]:
            assert {"label", "median", "min", "max", "goal", "met"} <= set(h)
            assert h["min"] <= h["median"] <= h["max"]
    hooked = json.loads((tmp_path / "hooked_generation.json").read_text())
    assert len(hooked["tok_s"]["hooked"]) == len(hooked["tok_s"]["unhooked"]) >= 1  # every repetition kept
    assert hooked["hooked_over_unhooked"]["values"]
    overhead = json.loads((tmp_path / "projection_overhead.json").read_text())
    assert set(overhead["results"]) == {"1", "8"}  # the batches of --quick
    for b in overhead["results"].values():
        assert b["one_mode_over_stock"]["values"] and b["plugin_no_mode_over_stock_cpu"]["values"]
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["quick"] and all(s["ok"] for s in run["benchmarks"].values())
    report = (tmp_path / "README.md").read_text()
    assert "| benchmark |" in report and "hooked_generation" in report
    assert (tmp_path / "ratios.png").is_file()
