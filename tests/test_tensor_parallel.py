"""Tensor parallelism 2 on vLLM's CPU build (two worker processes, gloo): a head-granularity pack
gives the tokens of TP 1, where each rank projects only the KV heads it holds.

A small random Llama (4 heads, 2 KV heads of 64: the CPU attention kernels need a head size such as
64) stands in for the bundled model, whose 3 KV heads do not split over 2 ranks; each engine runs in
its own process."""
from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from fresh_process import in_fresh_process  # noqa: E402
from random_llama import write_random_llama  # noqa: E402

from spd_engine import models  # noqa: E402
from spd_engine.calibrate import CalibrationConfig, calibrate  # noqa: E402
from spd_engine.data import load_examples, resolve_data  # noqa: E402
from spd_engine.subspace import Store  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

_GENERATE = """
from spd_engine.backend import GenerationRequest
from spd_engine.subspace import Store
from spd_engine.vllm_backend import VLLMBackend
be = VLLMBackend(ARGS["model"], tensor_parallel_size=ARGS["tp"], max_loras=0, max_num_seqs=4, max_model_len=256)
be.add_subspace(Store(ARGS["store"]).load("tp-head"))
reqs = [GenerationRequest(p, capability=tuple(c), max_tokens=12) for p in ARGS["prompts"] for c in ([], ["tp-head"])]
RESULT = [o.token_ids for o in be.generate(reqs)]
be.close()
"""


@pytest.fixture(scope="module")
def llama_2_kv_heads(tmp_path_factory, tokenizer):
    return write_random_llama(tokenizer, tmp_path_factory.mktemp("llama-2-kv-heads"), head_dim=64)


def test_tensor_parallel_2_with_a_head_pack_gives_the_tokens_of_tp_1(llama_2_kv_heads, tokenizer, tmp_path):
    model, _ = models.load(llama_2_kv_heads)
    gsm = load_examples(resolve_data("gsm8k"), "math", limit=2)
    pack = calibrate(model, tokenizer, models.info(llama_2_kv_heads), "math", gsm, "tp-head",
                     CalibrationConfig(rank=16, granularity="head", layers=[0, 1]))
    Store(tmp_path).save(pack)
    prompts = [tokenizer.encode(t) for t in ("What is 12 plus 7?", "Name a primary colour.")]
    args = {"model": str(llama_2_kv_heads), "store": str(tmp_path), "prompts": prompts}
    tp1 = in_fresh_process(_GENERATE, {**args, "tp": 1})
    tp2 = in_fresh_process(_GENERATE, {**args, "tp": 2}, VLLM_CPU_OMP_THREADS_BIND="0|1")
    assert tp2 == tp1
    assert tp1[1] != tp1[0] or tp1[3] != tp1[2], "the head pack changed no output: the test would prove nothing"
