"""The projection arithmetic, shared by every backend.

At one site (a layer's K or V as it enters the KV cache) a capability subspace is an orthonormal
basis U (w x r) per group of w channels (one group per layer, or one per KV head). Projecting a
row x with strength alpha gives

    x' = x + alpha * (U U^T x - x)

alpha = 1 is the hard projection, alpha = 0 leaves x bit-for-bit unchanged.

A `SiteBank` stacks the bases of every loaded mode side by side (W = [U_1 | U_2 | ...]), so a
flattened batch whose tokens use different modes is projected with two matmuls: coordinates in
every basis, then a one-hot mask keeps each token's own mode's coordinates.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NO_MODE = -1


def project(x: torch.Tensor, basis: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Reference form for one basis (w x r) and rows x (..., w)."""
    px = (x @ basis) @ basis.T
    return x + strength * (px - x)


def orthonormal_union(bases: list[torch.Tensor], tol: float = 1e-6) -> torch.Tensor:
    """An orthonormal basis of span(U_1 + U_2 + ...): how several modes compose."""
    stacked = torch.cat([b.to(torch.float64) for b in bases], dim=1)
    u, s, _ = torch.linalg.svd(stacked, full_matrices=False)
    keep = s > tol * s.max()
    return u[:, keep].to(bases[0].dtype)


@dataclass(frozen=True)
class SiteBank:
    """All slots' bases at one site. W: (w, R) with R the total rank; col_slot: (R,) the slot owning
    each column; covers: (S,) whether each slot projects this site at all."""

    W: torch.Tensor
    col_slot: torch.Tensor
    covers: torch.Tensor

    @staticmethod
    def build(slot_bases: list[torch.Tensor | None], dtype: torch.dtype = torch.float32) -> "SiteBank":
        """slot_bases[s] is slot s's basis (w, r_s) at this site, or None if slot s skips the site."""
        present = [b for b in slot_bases if b is not None]
        if not present:
            raise ValueError("a site bank needs at least one slot with a basis")
        width = present[0].shape[0]
        if any(b.shape[0] != width for b in present):
            raise ValueError(f"bases at one site must all have width {width}")
        owners = [torch.full((b.shape[1],), s, dtype=torch.long) for s, b in enumerate(slot_bases) if b is not None]
        covers = torch.tensor([b is not None for b in slot_bases])
        return SiteBank(torch.cat(present, dim=1).to(dtype), torch.cat(owners), covers)

    def apply(self, x: torch.Tensor, slot: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
        """Project rows x (N, ...) whose trailing dims flatten to w; slot (N,) long, NO_MODE for
        none; strength (N,). Rows without a mode, or whose slot skips this site, are unchanged."""
        shape = x.shape
        x2 = x.reshape(shape[0], -1)
        W = self.W.to(device=x.device, dtype=x.dtype)
        has = slot >= 0
        covered = self.covers.to(x.device)[slot.clamp(min=0)]
        alpha = torch.where(has & covered, strength.to(x.dtype), torch.zeros((), dtype=x.dtype))
        keep = (self.col_slot.to(x.device)[None, :] == slot[:, None]).to(x.dtype)  # (N, R)
        px = ((x2 @ W) * keep) @ W.T
        return (x2 + alpha[:, None] * (px - x2)).reshape(shape)
