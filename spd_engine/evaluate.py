"""Evaluation: a model, optionally with an adapter and/or a capability mode, on a data set.

`accuracy` generates greedily and scores each completion (final-number exact match, option
letter, pass@1 in the sandbox). `span-nll` is the teacher-forced NLL of the correctness span,
which has signal even where a small model's free-generation accuracy sits at the floor.
`letter-accuracy` (multiple choice) is scored the way lm-eval scores multiple choice: the
log-likelihood of each option letter after a fixed answer prefix (`Answer: (`), the most likely of
the example's own letters is the answer - no free text to parse, no letter outside the options.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Literal

import torch

from .backend import Backend, GenerationRequest
from .calibrate import batches, span_nll
from .formatting import calibration_ids, prompt_ids
from .hf_backend import HFBackend, SiteCache, projector
from .tasks import (
    MCQ_ANSWER_PREFIX,
    SHORT_ANSWER_TASKS,
    Example,
    Task,
    accuracy_interval,
    correctness_span,
    extract,
    letter,
    score,
    stop_strings,
)

Metric = Literal["accuracy", "span-nll", "letter-accuracy"]
# Bump when a scorer changes what it returns for the same completions or logits (extraction rules,
# answer formats, code programs): cached evaluations made under another version are not reused.
SCORING_VERSION = 2


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


def accuracy(backend: Backend, task: Task, examples: list[Example], *, capability: tuple[str, ...] = (),
             strength: float = 1.0, adapter: str | None = None, max_tokens: int = 256,
             progress: Callable[[int], None] | None = None) -> EvalResult:
    reqs = [GenerationRequest(prompt_ids(backend.tokenizer, task, ex), capability=capability, strength=strength,
                              adapter=adapter, max_tokens=max_tokens, stop=tuple(stop_strings(task)))
            for ex in examples]
    completions = backend.generate(reqs, progress=progress)
    return score_completions(task, examples, [c.text for c in completions])


def score_completions(task: Task, examples: list[Example], completions: list[str]) -> EvalResult:
    """Accuracy of given completions (one per example, in order) with its 95% Wilson interval; each item
    records the answer extracted from it (math, mcq)."""
    hits = [score(task, ex, c) for ex, c in zip(examples, completions, strict=True)]
    p, lo, hi = accuracy_interval(hits)
    items = [{"id": ex.id, "correct": h,
              "answer": extract(task, c, len(ex.options) or None) if task in SHORT_ANSWER_TASKS else None,
              "completion": c}
             for ex, h, c in zip(examples, hits, completions)]
    return EvalResult("accuracy", p, len(hits), lo, hi, items)


def span_nll_eval(backend: HFBackend, task: Task, examples: list[Example], *, capability: tuple[str, ...] = (),
                  strength: float = 1.0, adapter: str | None = None, batch_size: int = 4,
                  progress: Callable[[int], None] | None = None) -> EvalResult:
    """Mean span NLL with a 95% normal interval (a mean of many per-item values)."""
    if not isinstance(backend, HFBackend):
        raise ValueError("span-nll needs the transformers backend (teacher-forced logits)")
    bank = backend.bank.with_capability(capability)
    values: list[float] = []
    with torch.no_grad(), backend.adapter_active(adapter) as model:
        for ids, mask, spans in batches(backend.tokenizer, task, examples, batch_size):
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


def letter_candidates(tok, ex: Example) -> tuple[list[int], int, list[int]] | list[tuple[list[int], list[int]]]:
    """Teacher-forced sequences prompt + `Answer: (` + letter for each of the example's options. When they
    differ only in one token at one position (the usual case: the letter is one token), return that
    shared sequence, the position and each letter's token id, so one forward pass scores every letter;
    else the sequences and their letter positions."""
    if not ex.options:
        raise ValueError(f"example {ex.id!r} has no options: letter-accuracy scores multiple choice only")
    seqs = []
    for i in range(len(ex.options)):
        gold = f"{MCQ_ANSWER_PREFIX}{letter(i)})"
        seqs.append(calibration_ids(tok, "mcq", Example(id=ex.id, prompt=ex.prompt, answer=gold, options=ex.options,
                                                        span=(len(MCQ_ANSWER_PREFIX), len(MCQ_ANSWER_PREFIX) + 1))))
    first, pos = seqs[0]
    if all(len(p) == 1 and p == pos and len(ids) == len(first)
           and all(a == b for j, (a, b) in enumerate(zip(ids, first)) if j != pos[0]) for ids, p in seqs):
        return first, pos[0], [ids[pos[0]] for ids, _ in seqs]
    return seqs


def _logprob_rows(model, tok, bank, capability, strength, seqs: list[list[int]], want: list[list[int]],
                  batch_size: int) -> list[torch.Tensor]:
    """For each sequence, log-softmax over the vocabulary at the positions `want` (predicting that token)."""
    out: list[torch.Tensor] = []
    for start in range(0, len(seqs), batch_size):
        chunk, positions = seqs[start : start + batch_size], want[start : start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([c + [tok.pad_token_id] * (width - len(c)) for c in chunk])
        mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in chunk])
        slot = torch.full((ids.shape[0],), bank.slot(capability))
        alpha = torch.full((ids.shape[0],), strength)
        cache = SiteCache(model.config, projector(bank, slot, alpha))
        logits = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
        for b, pos in enumerate(positions):
            out.append(torch.log_softmax(logits[b, torch.tensor(pos) - 1].float(), dim=-1))
    return out


def letter_accuracy(backend: HFBackend, examples: list[Example], *, capability: tuple[str, ...] = (),
                    strength: float = 1.0, adapter: str | None = None, batch_size: int = 4,
                    progress: Callable[[int], None] | None = None) -> EvalResult:
    """Multiple-choice accuracy restricted to the option letters: after the fixed prefix `Answer: (`, the
    option letter with the highest log-likelihood is the model's answer (lm-eval's multiple-choice
    scoring). Each item records every letter's log-likelihood and the gold letter's probability
    renormalised over the letters."""
    if not isinstance(backend, HFBackend):
        raise ValueError("letter-accuracy needs the transformers backend (teacher-forced logits)")
    tok = backend.tokenizer
    bank = backend.bank.with_capability(capability)
    items: list[dict] = []
    with torch.no_grad(), backend.adapter_active(adapter) as model:
        for start in range(0, len(examples), batch_size):
            part = examples[start : start + batch_size]
            cands = [letter_candidates(tok, ex) for ex in part]
            seqs, want, owners = [], [], []  # one row per shared sequence, or per letter when not shared
            for k, c in enumerate(cands):
                rows = [(c[0], [c[1]])] if isinstance(c, tuple) else [(ids, p) for ids, p in c]
                for ids, p in rows:
                    seqs.append(ids)
                    want.append(p)
                    owners.append(k)
            logps = _logprob_rows(model, tok, bank, capability, strength, seqs, want, batch_size)
            for k, (ex, c) in enumerate(zip(part, cands)):
                mine = [lp for lp, o in zip(logps, owners) if o == k]
                if isinstance(c, tuple):
                    scores = [float(mine[0][0, t]) for t in c[2]]
                else:
                    scores = [float(lp.gather(1, torch.tensor([ids[q] for q in p])[:, None]).sum())
                              for lp, (ids, p) in zip(mine, c)]
                s, e = correctness_span("mcq", ex)
                gold = ex.answer[s:e]  # type: ignore[index]
                best = max(range(len(scores)), key=lambda i: scores[i])
                norm = torch.log_softmax(torch.tensor(scores, dtype=torch.float64), 0)
                items.append({"id": ex.id, "correct": letter(best) == gold, "answer": letter(best), "gold": gold,
                              "letter_logprobs": {letter(i): v for i, v in enumerate(scores)},
                              "gold_letter_prob": float(norm[ord(gold) - ord("A")].exp())})
            if progress:
                progress(len(part))
    p, lo, hi = accuracy_interval([it["correct"] for it in items])
    return EvalResult("letter-accuracy", p, len(items), lo, hi, items)
