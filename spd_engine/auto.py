"""`capability: "auto"`: the mode is chosen per request from the prompt's own K/V.

At the decision layer L (the earliest layer any candidate mode projects) the prompt's rows x_t,
as they enter the KV cache, are measured against each candidate's basis U at L:

    share(mode) = sum_t ||U^T (x_t - m)||^2 / sum_t ||x_t - m||^2,    m = mean_t x_t

over the prompt's tokens t, at the kinds of `AutoConfig.kinds` (V by default). The request takes
the mode with the largest share, or none when even that share is below `min_share`. Layers before
L are projected by no candidate, so deciding at L projects the prompt with the chosen mode from
its first token at every site. A mode that does not project L is never chosen (with the default
layers every mode projects the same two).

The rule is measured (bench/auto_routing.py, and the README): on SmolLM2-135M with GSM8K, BBH and
HumanEval modes, the share of the raw K and V energy (the first rule tried) chose worse than
chance; V rows centred on the prompt's own mean (removing what every token shares, the attention
sink and the chat template's common direction) chose best among the share rules tried.

The arithmetic is here, vLLM-free; the engine plugin calls it in the prefill step that writes L.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.parse
from collections import OrderedDict
from pathlib import Path
from dataclasses import dataclass

import torch

from .bank import Capability
from .projection import SiteBank
from .subspace import AUTO_MODE

__all__ = ["AUTO_MODE", "AutoConfig", "Decision", "Decisions", "site_energy", "choose", "report", "take_reports"]


@dataclass(frozen=True)
class AutoConfig:
    """The rule's one setting. `min_share`: below this share of the prompt's K/V energy no mode
    is applied (SPD_AUTO_MIN_SHARE; measured in bench/auto_routing.py)."""

    min_share: float = 0.0
    kinds: tuple[str, ...] = ("v",)  # the kinds measured (the measured rule: V)
    centered: bool = True  # rows minus the prompt's mean row (the measured rule)

    @staticmethod
    def from_env() -> "AutoConfig":
        raw = os.environ.get("SPD_AUTO_MIN_SHARE", "")
        value = float(raw) if raw.strip() else AutoConfig.min_share
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"SPD_AUTO_MIN_SHARE must be in [0, 1], got {raw!r}")
        return AutoConfig(value)


def site_energy(x: torch.Tensor, bank: SiteBank, centered: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """For one prompt's rows x (n, ...) at one site: the energy each slot's basis captures, (S,),
    and the rows' total energy (a scalar), in float32, of the rows minus their mean when
    `centered`. Slots that skip the site capture 0."""
    x2 = x.reshape(x.shape[0], -1).float()
    if centered:
        x2 = x2 - x2.mean(0)
    captured = (x2 @ bank.W.to(device=x2.device, dtype=torch.float32)).square().sum(0)  # (R,) per column
    per_slot = torch.zeros(len(bank.covers), device=x2.device).index_add_(0, bank.col_slot.to(x2.device), captured)
    return per_slot, x2.square().sum()


def choose(shares: dict[str, float], cfg: AutoConfig) -> Capability:
    """The chosen capability: the largest share (ties: the first name), none below min_share."""
    if not shares:
        return ()
    name = max(sorted(shares), key=lambda n: shares[n])
    return (name,) if shares[name] >= cfg.min_share and shares[name] > 0 else ()


@dataclass(frozen=True)
class Decision:
    capability: Capability
    shares: dict[str, float]
    layer: int


class Decisions:
    """A worker's auto decisions: per running request, and per decision key (the front end's hash
    of the prompt's tokens, the candidates' digests, the strength and the client's cache salt),
    so a request whose prompt K/V came from the prefix cache takes the decision that wrote them."""

    def __init__(self, max_keys: int = 4096):
        self.by_request: dict[str, Decision] = {}
        self.by_key: OrderedDict[str, Decision] = OrderedDict()
        self.max_keys = max_keys

    def get(self, request_id: str, key: str | None) -> Decision | None:
        hit = self.by_request.get(request_id)
        if hit is None and key is not None and key in self.by_key:
            hit = self.by_request[request_id] = self.by_key[key]
            self.by_key.move_to_end(key)
        return hit

    def put(self, request_id: str, key: str | None, decision: Decision) -> None:
        self.by_request[request_id] = decision
        if key is not None:
            self.by_key[key] = decision
            self.by_key.move_to_end(key)
            while len(self.by_key) > self.max_keys:
                self.by_key.popitem(last=False)

    def keep_only(self, running: set[str]) -> None:
        """Forget the decisions of requests that are no longer running."""
        for rid in [r for r in self.by_request if r not in running]:
            del self.by_request[rid]


# The decisions travel from the engine to the API server that answers the request as small files in
# the store (<store>/.auto/<quoted engine request id>.json): engine and API server may be different
# processes (one engine per data-parallel rank, several API servers), and both see the store.
REPORTS = ".auto"
REPORT_MAX_AGE_S = 600  # files nobody reads (offline requests, clients gone) are pruned after this


def report(store_root: Path, request_id: str, decision: Decision) -> None:
    """Leave one request's decision for the API server (atomic rename; not fsynced: ephemeral)."""
    name = urllib.parse.quote(request_id, safe="") + ".json"
    if len(name) > 240:
        raise ValueError("request id too long for a file name")
    folder = store_root / REPORTS
    folder.mkdir(exist_ok=True)
    tmp = folder / f".{name}.{os.getpid()}"
    tmp.write_text(json.dumps({"capability": list(decision.capability), "shares": decision.shares,
                               "layer": decision.layer}))
    os.replace(tmp, folder / name)
    if hash(request_id) % 256 == 0:  # now and then, not on every request
        prune(folder, REPORT_MAX_AGE_S)


def prune(folder: Path, max_age_s: float) -> None:
    cutoff = time.time() - max_age_s
    with os.scandir(folder) as entries:
        for entry in entries:
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)


def take_reports(store_root: Path, response_id: str) -> list[dict]:
    """The decisions reported for one OpenAI response's requests, one per prompt in prompt order,
    read and deleted. vLLM names a response's engine requests `<response id>-<suffix>`,
    `<response id>-<prompt index>-<suffix>` with several prompts, and `<n>_<that>` for n > 1
    (the n samples of a prompt share its decision: the first is taken)."""
    found: dict[int, tuple[int, dict]] = {}
    with contextlib.suppress(FileNotFoundError), os.scandir(store_root / REPORTS) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.endswith(".json"):
                continue
            rid = urllib.parse.unquote(entry.name[: -len(".json")])
            sample, _, rest = rid.partition("_")
            order, rid = (int(sample), rest) if sample.isdigit() and rest.startswith(f"{response_id}-") else (0, rid)
            if not rid.startswith(f"{response_id}-"):
                continue
            parts = rid[len(response_id) + 1:].split("-")
            prompt = int(parts[0]) if len(parts) > 1 and parts[0].isdigit() else 0
            try:
                decision = json.loads(Path(entry.path).read_text())
                os.unlink(entry.path)
            except (OSError, ValueError):
                continue
            if prompt not in found or order < found[prompt][0]:
                found[prompt] = (order, decision)
    return [found[p][1] for p in sorted(found)]
