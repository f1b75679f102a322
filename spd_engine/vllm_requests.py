"""How a `GenerationRequest` travels through vLLM, for every vLLM entry point (the offline
backend, the server's jobs, the plugin that reads it back in the workers): its mode and strength
as `SamplingParams.extra_args` (OpenAI: `vllm_xargs`), and the output back as a `Completion`."""
from __future__ import annotations

from typing import Any

from .backend import Completion, GenerationRequest
from .bank import Capability, capability_key

CAPABILITY_ARG = "capability"
STRENGTH_ARG = "capability_strength"
DIGESTS_ARG = "spd_digests"  # set by the plugin's front end: {mode name: pack digest}
AUTO_KEY_ARG = "spd_auto_key"  # set by the front end for capability auto: the decision's key (spd_engine.auto)


def parse_extra_args(extra_args: dict[str, Any] | None) -> tuple[Capability, float]:
    """A request's (capability, strength) from its extra_args; ValueError naming the field if malformed."""
    args = extra_args or {}
    raw = args.get(CAPABILITY_ARG)
    if raw is not None and not (isinstance(raw, str) or (isinstance(raw, list) and all(isinstance(n, str) for n in raw))):
        raise ValueError(f"{CAPABILITY_ARG} must be a mode name or a list of names, got {raw!r}")
    strength = args.get(STRENGTH_ARG, 1.0)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"{STRENGTH_ARG} must be a number in [0, 1], got {strength!r}")
    return capability_key(raw), float(strength)


def extra_args_for(capability: Capability, strength: float) -> dict[str, Any] | None:
    """The extra_args selecting a mode (None for no mode), the inverse of parse_extra_args."""
    return {CAPABILITY_ARG: list(capability), STRENGTH_ARG: strength} if capability else None


def sampling_params(r: GenerationRequest, **extra):
    from vllm import SamplingParams

    cap = r.capability if r.strength > 0 else ()
    return SamplingParams(max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p, seed=r.seed,
                          stop=list(r.stop) or None, ignore_eos=r.ignore_eos,
                          extra_args=extra_args_for(cap, r.strength), **extra)


def tokens_prompt(r: GenerationRequest):
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=list(r.prompt_ids))


def completion_of(output) -> Completion:
    """vLLM's RequestOutput as a Completion (without the end-of-sequence token)."""
    o = output.outputs[0]
    ids = list(o.token_ids)
    if o.finish_reason == "stop" and o.stop_reason is None and ids:
        ids = ids[:-1]  # vLLM keeps the end-of-sequence token; the interface does not
    return Completion(o.text, ids, "stop" if o.finish_reason == "stop" else "length")
