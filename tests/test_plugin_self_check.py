"""Failure handling at engine start: the plugin's self-check. Every hook must be installed; a vLLM
that lacks a hooked module or method (renamed by an upgrade) makes the engine refuse to start with a
message naming it, instead of serving requests that name a mode unprojected. Each case starts a
real engine (the bundled model) in a fresh process after making one hook target disappear."""
from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from fresh_process import in_fresh_process  # noqa: E402

pytestmark = pytest.mark.vllm

_START = """
import dataclasses
from server import vllm_plugin
vllm_plugin.HOOKS = tuple(dataclasses.replace(h, **ARGS["change"]) if h.method == ARGS["target"] else h
                          for h in vllm_plugin.HOOKS)
from vllm import LLM
try:
    LLM(model=ARGS["model"], dtype="float32", enforce_eager=True, distributed_executor_backend="uni",
        max_model_len=256)
    RESULT = {"started": True, "installed": sorted(vllm_plugin.PLUGIN.installed)}
except Exception as e:
    RESULT = {"started": False, "error": str(e)}
"""


def _start(bundled_path, target: str, **change) -> dict:
    """Start an engine after replacing fields of the hook of method `target`."""
    return in_fresh_process(_START, {"model": str(bundled_path), "target": target, "change": change},
                            VLLM_PLUGINS="spd_kv_projection")


def test_every_hook_is_installed_when_an_engine_starts(bundled_path):
    from server.vllm_plugin import HOOKS

    out = _start(bundled_path, "none")
    assert out["started"] and out["installed"] == sorted(h.name for h in HOOKS)


def test_an_engine_whose_vllm_lacks_a_hooked_method_refuses_to_start_naming_it(bundled_path):
    out = _start(bundled_path, "_model_forward", method="_model_forward_renamed")
    assert not out["started"]
    assert "GPUModelRunner._model_forward_renamed" in out["error"] and "refusing to start" in out["error"]


def test_an_engine_whose_vllm_lacks_a_hooked_module_refuses_to_start_naming_it(bundled_path):
    out = _start(bundled_path, "process_inputs", module="vllm.v1.engine.input_processor_renamed")
    assert not out["started"]
    assert "no module vllm.v1.engine.input_processor_renamed" in out["error"], out["error"]
