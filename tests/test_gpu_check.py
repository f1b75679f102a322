"""bench/gpu_check.py runs on the CPU (--quick) in a Python where vLLM cannot be imported, and
its JSON has every section with the equality checks passing. (On a GPU it is run by hand: the same
script with --device cuda; see its docstring.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the bundled model end to end (about a minute), no vLLM

REPO = Path(__file__).resolve().parent.parent
# sys.modules["vllm"] = None makes every `import vllm` (and vllm.*) raise ImportError
NO_VLLM = ("import runpy, sys; sys.modules['vllm'] = None; sys.argv = sys.argv[1:]; "
           "runpy.run_path(sys.argv[0], run_name='__main__')")


def test_gpu_check_runs_on_cpu_without_vllm(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "-c", NO_VLLM, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu",
                           "--quick", "--out", str(out)], capture_output=True, text=True, cwd=str(REPO), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["quick"] and r["vllm_imported"] is False
    assert r["calibration"]["seconds"] > 0 and r["calibration"]["ranks"] and r["calibration"]["rows"] > 0
    p = r["projection"]
    assert p["ok"] and len(p["max_abs_diff"]) == 4 and max(p["max_abs_diff"].values()) < 1e-4
    c = r["captured"]
    assert r["capture"] == c["capture"] == "torch.compile"
    assert c["ok"] and c["routes_differ"] and len(c["max_abs_diff"]) == c["routes"] >= 3
    assert max(c["max_abs_diff"]) < 1e-4
    g = r["generation"]
    assert g["tok_s"]["hooked"] and g["tok_s"]["unhooked"] and g["hooked_over_unhooked"] > 0
    d = r["distillation"]
    assert d["steps"] >= 1 and d["seconds"] > 0 and d["loss_after"] < d["loss_before"]
