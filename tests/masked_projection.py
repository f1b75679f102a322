"""The former `SiteBank.apply` (before the grouped one), verbatim: every row times every loaded
slot's columns, masked. The reference for tests/test_projection_grouped.py and the baseline of
bench/many_modes_projection.py."""
from __future__ import annotations

import torch

from spd_engine.projection import SiteBank


def masked_apply(bank: SiteBank, x: torch.Tensor, slot: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(shape[0], -1)
    W = bank.W.to(device=x.device, dtype=x.dtype)
    has = slot >= 0
    covered = bank.covers.to(x.device)[slot.clamp(min=0)]
    alpha = torch.where(has & covered, strength.to(x.dtype), torch.zeros((), dtype=x.dtype))
    keep = (bank.col_slot.to(x.device)[None, :] == slot[:, None]).to(x.dtype)  # (N, R)
    px = ((x2 @ W) * keep) @ W.T
    return (x2 + alpha[:, None] * (px - x2)).reshape(shape)
