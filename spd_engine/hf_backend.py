"""The transformers backend: the site is the KV-cache update of each attention layer.

`SiteCache` is a `DynamicCache` that hands new K/V (post rotary, before they are stored) to a
function, so the cached entries are the projected ones, as in vLLM. Calibration reuses the same
cache class to capture gradients at the very same place.
"""
from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
from typing import Callable

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from . import models
from .backend import Backend, Completion, GenerationRequest, Progress
from .bank import ProjectionBank
from .subspace import Subspace

SiteFn = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class SiteCache(DynamicCache):
    """A KV cache that passes each layer's new K and V (batch, heads, seq, head_dim) through
    `site_fn(layer, k, v)` before caching them."""

    def __init__(self, config, site_fn: SiteFn):
        super().__init__(config=config)
        self.site_fn = site_fn

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        key_states, value_states = self.site_fn(layer_idx, key_states, value_states)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


def rows(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, seq, head_dim) -> (batch*seq, heads*head_dim): one row per token, as vLLM."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b * t, h * d)


def unrows(r: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    b, h, t, d = like.shape
    return r.reshape(b, t, h, d).transpose(1, 2)


def projector(bank: ProjectionBank, slot: torch.Tensor, strength: torch.Tensor) -> SiteFn:
    """A site function applying `bank` with one slot and strength per batch row."""
    layers = {layer for layer, _ in bank.sites}

    def site_fn(layer: int, k: torch.Tensor, v: torch.Tensor):
        if layer not in layers:
            return k, v
        t = k.shape[2]
        s, a = slot.repeat_interleave(t), strength.repeat_interleave(t)
        k = unrows(bank.apply((layer, "k"), rows(k), s, a), k)
        v = unrows(bank.apply((layer, "v"), rows(v), s, a), v)
        return k, v

    return site_fn


class _StopOnStrings(StoppingCriteria):
    """Per-row stop strings (transformers' own criterion takes one list for the whole batch)."""

    def __init__(self, tok, stops: list[tuple[str, ...]], prompt_len: int):
        self.tok, self.stops, self.prompt_len = tok, stops, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        for i, stops in enumerate(self.stops):
            if stops:
                tail = self.tok.decode(input_ids[i, self.prompt_len:], skip_special_tokens=True)
                done[i] = any(s in tail for s in stops)
        return done.to(input_ids.device)


class HFBackend(Backend):
    name = "hf"

    def __init__(self, model: str, batch_size: int = 8, device: str = "cpu"):
        path = models.resolve(model)
        self.model_info = models.info(path)
        self.model, self.tokenizer = models.load(path, device)
        self.batch_size = batch_size
        self.bank = ProjectionBank()
        self._adapters: dict[str, str] = {}
        self._lock = threading.Lock()  # one generate (or adapter change) at a time
        self._bank_lock = threading.Lock()  # bank swaps never lose a concurrent add/remove

    # ---------------------------------------------------------------- modes and adapters

    def add_subspace(self, pack: Subspace) -> None:
        pack.check_model(self.model_info)
        with self._bank_lock:
            self.bank = self.bank.with_mode(pack)

    def remove_subspace(self, name: str) -> None:
        with self._bank_lock:
            if name not in self.bank.modes:
                raise KeyError(f"no capability named {name!r} is loaded")
            self.bank = self.bank.without_mode(name)

    def capabilities(self) -> list[str]:
        return sorted(self.bank.modes)

    def load_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        with self._lock:
            if name in self._adapters:
                raise ValueError(f"an adapter named {name!r} is already loaded")
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(path, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name).eval()
            self._adapters[name] = path

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self._adapters:
                raise KeyError(f"no adapter named {name!r} is loaded")
            del self._adapters[name]
            if self._adapters:
                self.model.delete_adapter(name)
            else:
                self.model = self.model.unload()  # last one: back to the plain model

    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    @contextlib.contextmanager
    def adapter_active(self, name: str | None):
        """Direct forward passes (teacher-forced scoring) through one adapter, or none."""
        from peft import PeftModel

        with self._lock:
            if name is not None and name not in self._adapters:
                raise KeyError(f"unknown adapter {name!r}; loaded: {', '.join(self.adapters()) or '(none)'}")
            if not isinstance(self.model, PeftModel):
                yield self.model
            elif name is None:
                with self.model.disable_adapter():
                    yield self.model
            else:
                self.model.set_adapter(name)
                yield self.model

    # ---------------------------------------------------------------- generation

    def generate(self, requests: list[GenerationRequest], progress: Progress | None = None) -> list[Completion]:
        for r in requests:
            self.bank.check(r.capability)
            if r.adapter is not None and r.adapter not in self._adapters:
                raise KeyError(f"unknown adapter {r.adapter!r}; loaded: {', '.join(self.adapters()) or '(none)'}")
        # transformers decodes one setting per call: group by decoding settings, then chunk
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[(r.max_tokens, r.temperature, r.top_p, r.seed, r.ignore_eos)].append(i)
        out: list[Completion | None] = [None] * len(requests)
        with self._lock:
            for idx in groups.values():
                for start in range(0, len(idx), self.batch_size):
                    chunk = idx[start : start + self.batch_size]
                    for i, c in zip(chunk, self._generate_batch([requests[i] for i in chunk])):
                        out[i] = c
                    if progress:
                        progress(len(chunk))
        return out  # type: ignore[return-value]

    def _generate_batch(self, reqs: list[GenerationRequest]) -> list[Completion]:
        from peft import PeftModel

        tok, first = self.tokenizer, reqs[0]
        width = max(len(r.prompt_ids) for r in reqs)
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in reqs])
        attention = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in reqs])
        with self._bank_lock:  # first-seen compositions get a slot, kept for later requests
            for r in reqs:
                self.bank = self.bank.with_capability(r.capability)
            bank = self.bank  # this batch keeps this bank even if modes change meanwhile
        slot = torch.tensor([bank.slot(r.capability) for r in reqs])
        strength = torch.tensor([r.strength for r in reqs], dtype=torch.float32)
        device = next(self.model.parameters()).device  # the prompts go where the model is
        input_ids, attention = input_ids.to(device), attention.to(device)
        cache = SiteCache(self.model.config, projector(bank, slot, strength))
        kwargs = {}
        if isinstance(self.model, PeftModel):
            kwargs["adapter_names"] = [r.adapter or "__base__" for r in reqs]
        if first.seed is not None:
            torch.manual_seed(first.seed)
        eos = self.model.generation_config.eos_token_id
        with torch.no_grad():
            seqs = self.model.generate(
                input_ids=input_ids, attention_mask=attention, past_key_values=cache,
                max_new_tokens=first.max_tokens, min_new_tokens=first.max_tokens if first.ignore_eos else None,
                do_sample=first.temperature > 0,
                temperature=first.temperature if first.temperature > 0 else None,
                top_p=first.top_p if first.temperature > 0 else None, top_k=None,
                pad_token_id=pad, eos_token_id=eos,
                stopping_criteria=StoppingCriteriaList([_StopOnStrings(tok, [r.stop for r in reqs], width)]),
                **kwargs,
            )
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        return [self._completion(seqs[i, width:].tolist(), r, eos_ids) for i, r in enumerate(reqs)]

    def _completion(self, ids: list[int], r: GenerationRequest, eos_ids: set[int]) -> Completion:
        cut = next((i for i, t in enumerate(ids) if t in eos_ids), None)
        ids = ids if cut is None else ids[:cut]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        hits = [text.find(s) for s in r.stop if s in text]
        if hits:
            return Completion(text[: min(hits)], ids, "stop")
        return Completion(text, ids, "stop" if cut is not None else "length")
