"""Two named fixes for vLLM's LoRA on the CPU (the torch LoRA ops), applied by the engine plugin
only where the running vLLM has the bug (README: "vLLM bugs this project fixes").

1. `no_adapter_rows_get_the_last_adapter` (vllm/lora/ops/torch_ops/lora_ops.py): the torch ops
   gather `weights[lora_indices]`, and index -1 ("no adapter for this token") selects the LAST
   adapter slot, so a request without an adapter batched next to adapter requests is served with
   an adapter once every slot is loaded. Decided by a behavioural probe (one tiny op call), not
   by a version string: a vLLM that fixed it is left alone. The fix clamps the index and zeroes
   the input rows of tokens without an adapter, so their delta is exactly zero. When no token of
   the call has an adapter, the op runs on one zero row, whose zero result its own broadcasting
   writes to every row: no (vocab x rank) adapter slice is gathered per token (bench
   `lora_no_adapter`). A startup probe checks that this equals the op on every row
   (`no_adapter_calls_match_the_op`).
2. `prompt_logprobs_use_request_adapter_indices` (vllm/v1/worker/gpu_model_runner.py,
   `_get_prompt_logprobs_dict`): prompt log-probabilities compute logits for a request's prompt
   tokens through the LoRA logits processor, whose CPU wrapper (`PunicaWrapperCPU.add_lora_logits`)
   indexes adapters by one entry per *sampled* token: the shapes differ (the engine dies: "einsum():
   subscript b has size 8 ...") or, where they happen to agree, tokens get another request's
   adapter. The fix gives each such call the per-token adapter indices of exactly those prompt
   tokens (`token_lora_indices`, what every other LoRA layer of the step uses).
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import torch

LORA_OPS = "vllm.lora.ops.torch_ops.lora_ops"
CPU_PUNICA = "vllm.lora.punica_wrapper.punica_cpu"
_GATHERING_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")  # the sgmv_* ops call these


def no_adapter_row_gets_an_adapter(bgmv_shrink: Callable) -> bool:
    """The probe: does a token with index -1 get a nonzero LoRA output from the op?"""
    weights = torch.ones(2, 1, 3, 4)  # 2 adapter slots, rank 3, input width 4
    out = torch.zeros(2, 3)
    bgmv_shrink(torch.ones(2, 4), weights, out, torch.tensor([-1, 0]), 1.0)
    return bool(out[0].abs().sum() > 0)


def _masked(op: Callable) -> Callable:
    def op_without_adapter_rows(inputs, weights, output, indices, *args, **kwargs):
        has_adapter = indices >= 0
        if not bool(has_adapter.any()):  # every row's delta is zero: compute one, the op broadcasts it
            return op(torch.zeros_like(inputs[:1]), weights, output, indices[:1].clamp(min=0), *args, **kwargs)
        keep = has_adapter.unsqueeze(-1).to(inputs.dtype)
        return op(inputs * keep, weights, output, indices.clamp(min=0), *args, **kwargs)

    op_without_adapter_rows.__spd_patched__ = True
    op_without_adapter_rows.__wrapped__ = op
    return op_without_adapter_rows


def fix_no_adapter_rows(punica_cpu) -> bool:
    """Apply fix 1 in the modules that bind the torch ops, if the probe finds the bug. Returns
    whether it was needed; RuntimeError if the ops still fail the probe after the fix."""
    ops = sys.modules[LORA_OPS]
    if not no_adapter_row_gets_an_adapter(ops.bgmv_shrink):
        return False
    package = sys.modules[LORA_OPS.rsplit(".", 1)[0]]
    for name in _GATHERING_OPS:
        fixed = _masked(getattr(ops, name))
        for module in (ops, package, punica_cpu):
            if hasattr(module, name):
                setattr(module, name, fixed)
    if no_adapter_row_gets_an_adapter(punica_cpu.bgmv_shrink):
        raise RuntimeError("spd_kv_projection: the fix for vLLM's LoRA index -1 did not take; refusing to start "
                           "(requests without an adapter would be served with one)")
    if not no_adapter_calls_match_the_op(ops):
        raise RuntimeError("spd_kv_projection: vLLM's torch LoRA ops changed how they write their output; the "
                           "one-row shortcut for calls without an adapter would differ from them; refusing to start")
    return True


def no_adapter_calls_match_the_op(ops) -> bool:
    """The probe of the shortcut: with no row holding an adapter, each patched op (`ops.<name>`) writes
    exactly what its unpatched op (`__wrapped__`) writes when every row's input is zero, for both
    values of `add_inputs`, into an output wider than the op's result."""
    gen = torch.Generator().manual_seed(0)
    inputs, weights = torch.randn(5, 4, generator=gen), torch.randn(2, 1, 6, 4, generator=gen)
    indices = torch.full((5,), -1)
    calls = [("bgmv_shrink", (0.5,))] + [(name, extra + (add,)) for add in (True, False)
                                          for name, extra in (("bgmv_expand", ()), ("bgmv_expand_slice", (1, 6)))]
    for name, extra in calls:
        fixed = getattr(ops, name)
        start = torch.randn(5, 9, generator=gen)
        got, want = start.clone(), start.clone()
        fixed(inputs, weights, got, indices, *extra)
        fixed.__wrapped__(torch.zeros_like(inputs), weights, want, indices.clamp(min=0), *extra)
        if not torch.equal(got, want):
            return False
    return True


def _logits_punica(runner):
    """The punica wrapper of the model's LoRA logits processor when it is the CPU (torch ops) one."""
    cached = runner.__dict__.get("_spd_logits_punica", False)
    if cached is not False:
        return cached
    found = None
    cpu = sys.modules.get(CPU_PUNICA)
    if cpu is not None and getattr(runner, "lora_config", None) is not None:
        for module in runner.model.modules():
            if type(module).__name__ == "LogitsProcessorWithLoRA" and isinstance(module.punica_wrapper,
                                                                                  cpu.PunicaWrapperCPU):
                found = module.punica_wrapper
                break
    runner._spd_logits_punica = found
    return found


@contextlib.contextmanager
def _sampler_indices(punica, indices: torch.Tensor) -> Iterator[None]:
    """Temporarily make `indices` the wrapper's per-sampled-row adapter indices."""
    old_len = punica.indices_len[1]
    saved = punica._sampler_indices[:old_len].clone()
    punica._sampler_indices[: indices.shape[0]].copy_(indices)
    punica.indices_len[1] = indices.shape[0]
    try:
        yield
    finally:
        punica._sampler_indices[:old_len].copy_(saved)
        punica.indices_len[1] = old_len


def wrap_prompt_logprobs(orig: Callable) -> Callable:
    """Fix 2, around `GPUModelRunner._get_prompt_logprobs_dict(hidden_states, num_scheduled_tokens)`:
    each `model.compute_logits(hidden_states[offset:offset + n])` it makes is scored with the adapter
    indices of tokens offset..offset+n of the step."""
    def _get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):
        punica = _logits_punica(self) if self.num_prompt_logprobs else None
        if punica is None:
            return orig(self, hidden_states, num_scheduled_tokens)
        model, compute = self.model, self.model.compute_logits
        row_bytes = hidden_states.stride(0) * hidden_states.element_size()

        def compute_logits(h, *args, **kwargs):
            row = (h.data_ptr() - hidden_states.data_ptr()) // row_bytes
            with _sampler_indices(punica, punica.token_lora_indices[row: row + h.shape[0]]):
                return compute(h, *args, **kwargs)

        own = model.__dict__.get("compute_logits")
        model.compute_logits = compute_logits
        try:
            return orig(self, hidden_states, num_scheduled_tokens)
        finally:
            if own is None:
                del model.compute_logits  # the class's method again
            else:
                model.compute_logits = own

    _get_prompt_logprobs_dict.__spd_patched__ = True
    return _get_prompt_logprobs_dict
