"""Modes as model names, for clients that can only choose `model` (lm-eval's log-likelihood
requests, LangChain, chat UIs, the openai CLI, routers):

    MODEL@MODE              MODEL under one mode, strength 1
    MODEL@MODE+MODE         a composition (projection onto the span of their union)
    MODEL@MODE:0.5          a strength in [0, 1]
    MODEL@MODE+MODE:0.5     both

MODEL is the served model's name or a loaded adapter's. Mode and adapter names never contain
`@`, `+` or `:` (`[A-Za-z0-9._-]`), so a name splits one way only: at its last `@`. A request
naming such a model is the request for MODEL with `capability` / `capability_strength`, tokens,
validation and prefix-cache salt included. `/v1/models` lists one entry per served model or
adapter and mode (compositions and strengths are accepted, not listed)."""
from __future__ import annotations

import re

from spd_engine.paths import NAME_PATTERN
from spd_engine.vllm_requests import CAPABILITY_ARG, STRENGTH_ARG

_NAME = re.compile(NAME_PATTERN)


def split(model: str, known: set[str]) -> tuple[str, dict] | None:
    """(MODEL, its capability fields) for a mode model name whose MODEL is in `known`; None for any
    other name (vLLM answers for it). ValueError naming `model` for a malformed mode part."""
    base, at, spec = model.rpartition("@")
    if not at or base not in known:
        return None
    modes, colon, strength = spec.partition(":")
    names = modes.split("+")
    if not all(_NAME.fullmatch(n) for n in names):
        raise ValueError(f"model: {model!r} names modes {modes!r}; write MODEL@MODE[+MODE...][:STRENGTH]")
    fields: dict = {CAPABILITY_ARG: names[0] if len(names) == 1 else names}
    if colon:
        try:
            fields[STRENGTH_ARG] = float(strength)
        except ValueError:
            raise ValueError(f"model: strength {strength!r} in {model!r} is not a number") from None
    return base, fields


def apply(body: dict, known: set[str]) -> dict:
    """The request with a mode model name turned into MODEL and its capability fields (ValueError
    if the request also names other capability fields)."""
    model = body.get("model")
    parsed = split(model, known) if isinstance(model, str) else None
    if parsed is None:
        return body
    base, fields = parsed
    for k, v in fields.items():
        if k in body and body[k] != v:
            raise ValueError(f"{k}: the model {model!r} says {v!r}, the request says {body[k]!r}")
    return {**body, **fields, "model": base}


def listed(models: dict, modes: list[str]) -> dict:
    """vLLM's /v1/models answer with an entry per listed model and mode."""
    extra = [{**m, "id": f"{m['id']}@{mode}", "parent": m["id"], "owned_by": "spd"}
             for m in models.get("data", []) if isinstance(m, dict) and "@" not in str(m.get("id")) for mode in modes]
    return {**models, "data": [*models.get("data", []), *extra]}
