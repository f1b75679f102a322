"""The bank of loaded modes that a backend projects with: one slot per mode or composition.

A bank is immutable. Adding or removing a mode, or composing modes for the first time, builds a
new bank, and the backend swaps its reference: a step already running keeps the bank it started
with, so requests in flight are never affected.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .projection import NO_MODE, SiteBank, SlotGroups, orthonormal_union
from .subspace import Site, Subspace, site_basis

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
