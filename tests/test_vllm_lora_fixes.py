"""Backend correctness under LoRA: the plugin's fixes for vLLM-CPU's LoRA bugs (server/vllm_lora_fixes.py).
Each check runs the same script on stock vLLM (plugin not loaded) and with the plugin, in fresh processes
on the real bundled model with two random adapters filling both adapter slots."""
from __future__ import annotations

import math

import pytest

pytest.importorskip("vllm")

from fresh_process import in_fresh_process  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = ["Count to five:", "My favourite fruit is", "2 + 2 =", "The best way to learn is",
           "Write one sentence about the sea at night:", "The capital of France is"]

_SCRIPT = """
from pathlib import Path
from server.harness import write_random_lora
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest
from server import vllm_plugin
import inspect
from server.vllm_lora_fixes import no_adapter_row_gets_an_adapter
import vllm.lora.ops.torch_ops.lora_ops as ops

adapters = [LoRARequest(f"a{i}", i + 1, str(write_random_lora(Path(ARGS["model"]), Path(ARGS["tmp"]) / f"a{i}", seed=i)))
            for i in range(2)]
llm = LLM(model=ARGS["model"], dtype="float32", enforce_eager=True, distributed_executor_backend="uni", seed=0,
          max_model_len=512, enable_lora=True, max_loras=2, max_lora_rank=8)
prompts, greedy = ARGS["prompts"], SamplingParams(max_tokens=10, temperature=0)
def texts(ps, loras):
    return [o.outputs[0].text for o in llm.generate(ps, greedy, lora_request=loras, use_tqdm=False)]
def scored(ps, loras):
    sp = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    try:
        outs = llm.generate(ps, sp, lora_request=loras, use_tqdm=False)
    except Exception as e:
        return repr(e)[:300]
    return [[next(iter(d.values())).logprob for d in o.prompt_logprobs[1:]] for o in outs]
solo = {"base": [texts([p], None)[0] for p in prompts],
        "a0": [texts([p], adapters[0])[0] for p in prompts], "a1": [texts([p], adapters[1])[0] for p in prompts]}
texts([prompts[0]] * 2, adapters)  # both slots loaded: the last slot is now an adapter
mixed = texts(prompts * 3, [None] * len(prompts) + [adapters[0]] * len(prompts) + [adapters[1]] * len(prompts))
n = len(prompts)
RESULT = {"patched": vllm_plugin.is_active(), "fixes": vllm_plugin.PLUGIN.fixes,
          "stock_op_has_bug": no_adapter_row_gets_an_adapter(inspect.unwrap(ops.bgmv_shrink)),
          "solo": solo, "mixed": {"base": mixed[:n], "a0": mixed[n:2 * n], "a1": mixed[2 * n:]},
          "scored_solo": {"base": scored(prompts[:2], None), "a0": scored(prompts[:2], adapters[0])},
          "scored_mixed": scored(prompts[:2] * 2, [None, None, adapters[0], adapters[0]])}
"""


@pytest.fixture(scope="module")
def runs(bundled_path, tmp_path_factory):
    args = {"model": str(bundled_path), "prompts": PROMPTS}
    stock = in_fresh_process(_SCRIPT, {**args, "tmp": str(tmp_path_factory.mktemp("stock"))}, VLLM_PLUGINS="none")
    ours = in_fresh_process(_SCRIPT, {**args, "tmp": str(tmp_path_factory.mktemp("ours"))},
                            VLLM_PLUGINS="spd_kv_projection")
    assert not stock["patched"] and ours["patched"]
    return stock, ours


def _wrong(run) -> int:
    return sum(m != s for kind in run["solo"] for m, s in zip(run["mixed"][kind], run["solo"][kind]))


def test_the_test_adapters_change_at_least_half_of_the_greedy_answers(runs):
    _, ours = runs
    for kind in ("a0", "a1"):
        changed = sum(a != b for a, b in zip(ours["solo"][kind], ours["solo"]["base"]))
        assert changed >= len(PROMPTS) / 2, f"adapter {kind} changes only {changed} of {len(PROMPTS)} answers"


def test_requests_without_an_adapter_batched_beside_adapter_requests_get_their_solo_tokens(runs):
    stock, ours = runs
    assert stock["solo"] == ours["solo"]  # the plugin changes nothing a request makes alone
    assert _wrong(ours) == 0, ours["mixed"]
    # the probe that decides the fix agrees with what stock vLLM really does in a mixed batch
    assert stock["stock_op_has_bug"] == (_wrong(stock) > 0), (stock["stock_op_has_bug"], _wrong(stock))
    assert ("no_adapter_rows_get_the_last_adapter" in ours["fixes"]) == stock["stock_op_has_bug"]


def test_prompt_logprobs_under_lora_score_each_token_with_its_own_requests_adapter(runs):
    _, ours = runs
    solo, mixed = ours["scored_solo"], ours["scored_mixed"]
    assert isinstance(mixed, list), f"prompt logprobs under LoRA failed: {mixed}"
    assert solo["base"] != solo["a0"]  # the adapter changes prompt scores
    for got, want in zip(mixed, solo["base"] + solo["a0"]):
        assert len(got) == len(want) and all(math.isclose(g, w, abs_tol=1e-3) for g, w in zip(got, want)), (got, want)


def test_the_no_adapter_shortcut_writes_what_the_op_writes_on_zero_rows_and_the_probe_catches_one_that_does_not():
    import inspect
    from types import SimpleNamespace

    import vllm.lora.ops.torch_ops.lora_ops as ops

    from server.vllm_lora_fixes import _GATHERING_OPS, _masked, no_adapter_calls_match_the_op

    stock = {name: inspect.unwrap(getattr(ops, name)) for name in _GATHERING_OPS}
    assert no_adapter_calls_match_the_op(SimpleNamespace(**{n: _masked(op) for n, op in stock.items()}))

    def skipping(op):  # a shortcut that writes nothing: wrong wherever the op overwrites its output
        def skip(inputs, weights, output, indices, *args):
            if not bool((indices >= 0).any()):
                return None
            return op(inputs, weights, output, indices, *args)
        skip.__wrapped__ = op
        return skip

    for broken in _GATHERING_OPS:
        wrong = {n: (skipping(op) if n == broken else _masked(op)) for n, op in stock.items()}
        assert not no_adapter_calls_match_the_op(SimpleNamespace(**wrong)), broken
