"""Evaluation: a model, optionally with an adapter and/or a capability mode, on a data set.

`accuracy` generates greedily and scores each completion (final-number exact match, option
letter, pass@1 in the sandbox). `span-nll` is the teacher-forced NLL of the correctness span,
which has signal even where a small model's free-generation accuracy sits at the floor.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Literal

import torch

from .backend import Backend, GenerationRequest
from .calibrate import batches, span_nll
from .formatting import prompt_ids
from .hf_backend import HFBackend, SiteCache, projector
from .tasks import SHORT_ANSWER_KINDS, Example, Kind, accuracy_interval, extract, score, stop_strings

Metric = Literal["accuracy", "span-nll"]


@dataclass
class EvalResult:
    metric: str
    value: float
    n: int
    ci_low: float
    ci_high: float
    items: list[dict]

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("items")
        return d


def accuracy(backend: Backend, kind: Kind, examples: list[Example], *, capability: tuple[str, ...] = (),
             strength: float = 1.0, adapter: str | None = None, max_tokens: int = 256,
             progress: Callable[[int], None] | None = None) -> EvalResult:
    reqs = [GenerationRequest(prompt_ids(backend.tokenizer, kind, ex), capability=capability, strength=strength,
                              adapter=adapter, max_tokens=max_tokens, stop=tuple(stop_strings(kind)))
            for ex in examples]
    completions = backend.generate(reqs, progress=progress)
    return score_completions(kind, examples, [c.text for c in completions])


def score_completions(kind: Kind, examples: list[Example], completions: list[str]) -> EvalResult:
    """Accuracy of given completions (one per example, in order) with its 95% Wilson interval; each item
    records the answer extracted from it (math, mcq)."""
    hits = [score(kind, ex, c) for ex, c in zip(examples, completions, strict=True)]
    p, lo, hi = accuracy_interval(hits)
    items = [{"id": ex.id, "correct": h, "answer": extract(kind, c) if kind in SHORT_ANSWER_KINDS else None,
              "completion": c}
             for ex, h, c in zip(examples, hits, completions)]
    return EvalResult("accuracy", p, len(hits), lo, hi, items)


def span_nll_eval(backend: HFBackend, kind: Kind, examples: list[Example], *, capability: tuple[str, ...] = (),
                  strength: float = 1.0, adapter: str | None = None, batch_size: int = 4,
                  progress: Callable[[int], None] | None = None) -> EvalResult:
    """Mean span NLL with a 95% normal interval (a mean of many per-item values)."""
    if not isinstance(backend, HFBackend):
        raise ValueError("span-nll needs the transformers backend (teacher-forced logits)")
    bank = backend.bank.with_capability(capability)
    values: list[float] = []
    with torch.no_grad(), backend.adapter_active(adapter) as model:
        for ids, mask, spans in batches(backend.tokenizer, kind, examples, batch_size):
            slot = torch.full((ids.shape[0],), bank.slot(capability))
            alpha = torch.full((ids.shape[0],), strength)
            cache = SiteCache(model.config, projector(bank, slot, alpha))
            logits = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
            values += span_nll(logits, ids, spans).tolist()
            if progress:
                progress(len(spans))
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, n - 1))
    half = 1.96 * sd / math.sqrt(n)
    items = [{"id": ex.id, "span_nll": v} for ex, v in zip(examples, values)]
    return EvalResult("span-nll", mean, n, mean - half, mean + half, items)
