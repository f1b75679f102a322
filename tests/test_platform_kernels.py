"""The plugin loads only the kernel library the running platform loads.

vLLM's CPU wheel ships three builds of its kernels (`_C`: AVX-512 + BF16, `_C_AVX512`, `_C_AVX2`)
that register the same torch library: loading a second one aborts the process. Each test runs in
a fresh process that can be made to take the AVX2 path (the AVX2 build runs on AVX-512 CPUs too),
so an AVX2-only machine is reproduced wherever the suite runs. Before the fix, `register()`
imported every attention backend, GPU ones included, which load `vllm._C`, and the AVX2 runs
below aborted with "Only a single TORCH_LIBRARY can be used to register the namespace _C"."""
from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from fresh_process import in_fresh_process  # noqa: E402

pytestmark = pytest.mark.vllm

# Runs first in the child: optionally hide AVX-512 from vLLM's CPU platform (it asks torch).
_PRELUDE = """
import json, os, sys
import torch
if ARGS["avx2"]:
    torch.cpu._is_avx512_supported = lambda: False
    torch.cpu._is_avx512_bf16_supported = lambda: False

def kernel_libraries():
    # the vllm/_C*.so files mapped into this process (a build loads as a library, even where
    # Python reports an ImportError for the module name)
    with open("/proc/self/maps") as f:
        names = {os.path.basename(line.split()[-1]) for line in f if "/vllm/_C" in line}
    return sorted(n.split(".")[0] for n in names)
"""

_REGISTER = """
from vllm.plugins import load_general_plugins
load_general_plugins()   # loads spd_kv_projection through its entry point, as every vLLM process does
from server import vllm_plugin
after_register = kernel_libraries()
from vllm.platforms import current_platform
current_platform.import_kernels()
RESULT = {"registered": vllm_plugin.PLUGIN.registered, "after_register": after_register, "after_platform": kernel_libraries()}
"""

_ENGINE = """
from vllm import LLM, SamplingParams
llm = LLM(model=ARGS["model"], dtype="float32", enforce_eager=True, distributed_executor_backend="uni",
          max_model_len=512, seed=0)
sp = lambda xargs: SamplingParams(max_tokens=16, temperature=0.0, extra_args=xargs)
prompts = ["The capital of France is", "Tom has 3 apples and buys 5 more. How many now?"]
plain = llm.generate(prompts, sp(None), use_tqdm=False)
moded = llm.generate(prompts, sp({"capability": ARGS["mode"], "capability_strength": 1.0}), use_tqdm=False)
from server import vllm_plugin
RESULT = {"plain": [list(o.outputs[0].token_ids) for o in plain], "moded": [list(o.outputs[0].token_ids) for o in moded],
          "active": vllm_plugin.is_active(), "kernels": kernel_libraries()}
"""

EXPECTED = {True: ["_C_AVX2"], False: None}  # None: whichever one build the platform picks here


def _run(code: str, args: dict, **env: str) -> dict:
    """`code` after the prelude in a fresh process, with the plugin loaded through its entry point."""
    return in_fresh_process(f"{_PRELUDE}\n{code}", args, timeout=600, VLLM_PLUGINS=None, **env)


@pytest.mark.parametrize("avx2", [True, False], ids=["avx2-path", "native-path"])
def test_register_loads_no_kernel_library_and_the_platform_then_loads_exactly_one(avx2):
    out = _run(_REGISTER, {"avx2": avx2})
    assert out["registered"]
    assert out["after_register"] == [], "register() loaded vLLM kernels before the platform chose them"
    assert len(out["after_platform"]) == 1
    if EXPECTED[avx2] is not None:
        assert out["after_platform"] == EXPECTED[avx2]


@pytest.mark.slow
def test_engine_on_the_avx2_kernels_starts_and_projects_a_request_in_its_mode(hf_backend, bundled_path, tmp_path):
    from spd_engine.calibrate import CalibrationConfig, calibrate
    from spd_engine.data import load_examples, resolve_data
    from spd_engine.subspace import Store

    be = hf_backend
    gsm = load_examples(resolve_data("gsm8k"), "math", limit=2)
    pack = calibrate(be.model, be.tokenizer, be.model_info, "math", gsm, "avx2-rand",
                     CalibrationConfig(rank=8, method="random"))
    Store(tmp_path).save(pack)
    out = _run(_ENGINE, {"avx2": True, "model": str(bundled_path), "mode": "avx2-rand"}, SPD_STORE_DIR=str(tmp_path))
    assert out["kernels"] == ["_C_AVX2"]
    assert out["active"], "the attention backend in use was not patched"
    assert out["plain"] != out["moded"], "a random rank-8 subspace at strength 1 left every token unchanged"
