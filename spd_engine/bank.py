"""The bank of loaded modes that a backend projects with: one slot per mode or composition.

A bank is immutable. Adding or removing a mode, or composing modes for the first time, builds a
new bank, and the backend swaps its reference: a step already running keeps the bank it started
with, so requests in flight are never affected. `ModeCache` keeps one process's bank in step with
the store, loading each mode with the digest its request was admitted with.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .models import ModelInfo
from .projection import NO_MODE, RouteBuffers, SiteBank, SiteBuffers, SlotGroups, orthonormal_union
from .subspace import Site, Store, Subspace, load, pack_digest, site_basis

log = logging.getLogger("spd.bank")

Capability = tuple[str, ...]  # sorted, unique mode names; () = no mode


def capability_key(names: str | Iterable[str] | None) -> Capability:
    if names is None:
        return ()
    if isinstance(names, str):
        names = [names]
    return tuple(sorted(set(names)))


class ProjectionBank:
    def __init__(self, modes: dict[str, Subspace] | None = None, slots: Sequence[Capability] = (),
                 heads: list[int] | None = None):
        self.modes = dict(modes or {})
        self.heads = heads
        # every single mode has a slot; compositions keep theirs while all their modes exist
        singles = [(n,) for n in sorted(self.modes)]
        combos = [c for c in slots if len(c) > 1 and all(n in self.modes for n in c)]
        self.slots: list[Capability] = singles + [c for c in dict.fromkeys(combos) if c not in singles]
        self.index = {c: i for i, c in enumerate(self.slots)}
        self.sites: dict[Site, SiteBank] = {}
        all_sites = sorted({s for p in self.modes.values() for s in p.bases})
        for site in all_sites:
            self.sites[site] = SiteBank.build([self._slot_basis(c, site) for c in self.slots])

    def _slot_basis(self, capability: Capability, site: Site) -> torch.Tensor | None:
        parts = [site_basis(self.modes[n], site, self.heads) for n in capability if site in self.modes[n].bases]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else orthonormal_union(parts)

    def with_mode(self, pack: Subspace) -> "ProjectionBank":
        return ProjectionBank({**self.modes, pack.name: pack}, self.slots, self.heads)

    def without_mode(self, name: str) -> "ProjectionBank":
        return ProjectionBank({n: p for n, p in self.modes.items() if n != name}, self.slots, self.heads)

    def with_capability(self, capability: Capability) -> "ProjectionBank":
        """This bank, or a new one with a slot for a first-seen composition."""
        self.check(capability)
        if not capability or capability in self.index:
            return self
        return ProjectionBank(self.modes, [*self.slots, capability], self.heads)

    def check(self, capability: Capability) -> None:
        unknown = [n for n in capability if n not in self.modes]
        if unknown:
            raise KeyError(
                f"unknown capability {', '.join(map(repr, unknown))}; loaded: {', '.join(sorted(self.modes)) or '(none)'}"
            )

    def slot(self, capability: Capability) -> int:
        return NO_MODE if not capability else self.index[capability]

    def apply(self, site: Site, x: torch.Tensor, slot: torch.Tensor, strength: torch.Tensor,
              groups: SlotGroups | None = None) -> torch.Tensor:
        """`SiteBank.apply` at `site` (x unchanged where no slot has a basis); `groups`, optional,
        are the rows' `SlotGroups`, built once per step and shared by every site."""
        bank = self.sites.get(site)
        return x if bank is None else bank.apply(x, slot, strength, groups)


class ModeCache:
    """One worker's loaded modes, each with the digest it was loaded with. The bank is swapped by
    reference: a step keeps the bank it started with. A request names each mode's digest (set when
    it was admitted); a mode whose digest changed in the store (deleted and re-imported under the
    same name) is reloaded, from the retained copy if the store no longer holds those bases. Modes
    and compositions beyond the caps are evicted least recently used first (never one the current
    step needs). `heads`: the KV heads this worker holds (tensor parallelism), None for all."""

    def __init__(self, model: ModelInfo, heads: list[int] | None, root: Path, max_modes: int = 64,
                 max_compositions: int = 32):
        self.model, self.max_modes, self.max_compositions = model, max_modes, max_compositions
        self.store = Store(root, clean=False)
        self.bank = ProjectionBank(heads=heads)
        self.digests: dict[str, str] = {}
        self._used: dict[Capability, None] = {}  # recency order, oldest first
        self._lock = threading.Lock()
        # the current bank's site banks on one device and dtype: (bank, device, dtype, sites)
        self._on_device: tuple[ProjectionBank, torch.device, torch.dtype, dict[Site, SiteBank]] | None = None

    def bank_for(self, caps: list[Capability], digests: dict[str, str]) -> tuple[ProjectionBank, list[Capability]]:
        """The bank for one step's capabilities and the capabilities it serves: a mode that cannot
        be loaded with the digest its request was admitted with is logged and not served."""
        with self._lock:
            bank = self.bank
            for name in sorted({n for c in caps for n in c}):
                want = digests.get(name)
                if name in bank.modes and (want is None or self.digests[name] == want):
                    continue
                try:
                    path = self.store.path(name)
                    if want is not None and (not path.is_dir() or pack_digest(path) != want):
                        path = self.store.retained(want)  # deleted or replaced since its request was admitted
                    pack = load(path, self.model)
                    got = pack_digest(path)
                    if want is not None and got != want:
                        raise ValueError(f"the bases admitted (digest {want}) are gone")
                    bank = (bank.without_mode(name) if name in bank.modes else bank).with_mode(pack)
                except (KeyError, ValueError, OSError) as e:  # PackError is a ValueError (e.g. a layer pack under TP)
                    log.error("capability %r cannot be loaded from %s (%s); not projected", name, self.store.root, e)
                    if name in bank.modes:
                        bank = bank.without_mode(name)
                    continue
                self.digests[name] = got
            served = [c if all(n in bank.modes for n in c) else () for c in caps]
            for c in served:
                if c:
                    self._used.pop(c, None)
                    self._used[c] = None
                    bank = bank.with_capability(c)
            self.bank = self._evict(bank, set(served))
            return self.bank, served

    def _evict(self, bank: ProjectionBank, keep: set[Capability]) -> ProjectionBank:
        combos = [c for c in self._used if len(c) > 1 and c in bank.index and c not in keep]
        for c in combos[: max(0, len(bank.slots) - len(bank.modes) - self.max_compositions)]:
            bank = ProjectionBank(bank.modes, [s for s in bank.slots if s != c], bank.heads)
            del self._used[c]
        needed = {n for c in keep for n in c}
        for c in [c for c in self._used if len(c) == 1 and c[0] not in needed]:
            if len(bank.modes) <= self.max_modes:
                break
            bank = bank.without_mode(c[0])
            self.digests.pop(c[0], None)
            del self._used[c]
        return bank

    def on_device(self, bank: ProjectionBank, device: torch.device, dtype: torch.dtype) -> dict[Site, SiteBank]:
        """`bank`'s site banks with W in `dtype` and every tensor on `device`: built once per bank
        (and device/dtype), then reused by every layer and step, so `SiteBank.apply`'s own `.to()`
        calls are no-ops. On the CPU in float32 these are the bank's own tensors (no copy)."""
        cached = self._on_device
        if cached is not None and cached[0] is bank and cached[1] == device and cached[2] == dtype:
            return cached[3]
        sites = {site: SiteBank(sb.W.to(device=device, dtype=dtype), sb.col_slot.to(device), sb.covers.to(device))
                 for site, sb in bank.sites.items()}
        self._on_device = (bank, device, dtype, sites)
        return sites


class CapturedBank:
    """A worker's bank as a captured graph reads it: `SiteBuffers` at every site a pack may cover
    (each layer's K and V, `width` channels), allocated once, holding the distinct capabilities of
    one step only (at most `max_slots`, `max_rank` columns per site) and rewritten in place when
    those change. Every layer projects through `project_routed`, so its cost is the buffers' whole
    capacity, route or not: the price of one graph for every step."""

    def __init__(self, n_layers: int, width: int, max_slots: int, max_rank: int, device: torch.device,
                 dtype: torch.dtype):
        self.max_slots, self.max_rank = max_slots, max_rank
        self.buffers = {(layer, kind): SiteBuffers(width, max_rank, max_slots, device, dtype)
                        for layer in range(n_layers) for kind in ("k", "v")}
        self._written: tuple[ProjectionBank, tuple[Capability, ...]] | None = None

    def load(self, bank: ProjectionBank, caps: Sequence[Capability]) -> dict[Capability, int] | None:
        """Write `bank`'s capabilities `caps` (none empty) into the buffers; each one's slot there, or
        None when they do not fit (then nothing is written). Sorted, so a step whose batch holds the
        same capabilities in another order rewrites nothing."""
        caps = tuple(sorted(set(caps)))
        written = self._written
        if written is None or written[0] is not bank or written[1] != caps:
            if len(caps) > self.max_slots or any(site not in self.buffers for site in bank.sites):
                return None
            compact: dict[Site, SiteBank | None] = {}
            for site, sb in bank.sites.items():
                bases = [sb.bases[bank.slot(c)] for c in caps]
                if sum(b.shape[1] for b in bases if b is not None) > self.max_rank:
                    return None
                compact[site] = SiteBank.build(bases) if any(b is not None for b in bases) else None
            for site, buf in self.buffers.items():
                buf.write(compact.get(site))
            self._written = (bank, caps)
        return {c: i for i, c in enumerate(caps)}

    def apply(self, layer: int, key: torch.Tensor, value: torch.Tensor,
              route: RouteBuffers) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's K and V projected with the route and bank in the buffers (a layer past the
        model's, e.g. a drafter's, unchanged)."""
        k, v = self.buffers.get((layer, "k")), self.buffers.get((layer, "v"))
        return (key if k is None else k.apply(key, route)), (value if v is None else v.apply(value, route))
