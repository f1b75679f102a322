"""The projection arithmetic, shared by every backend.

At one site (a layer's K or V as it enters the KV cache) a capability subspace is an orthonormal
basis U (w x r) per group of w channels (one group per layer, or one per KV head). Projecting a
row x with strength alpha gives

    x' = x + alpha * (U U^T x - x)

alpha = 1 is the hard projection, alpha = 0 leaves x bit-for-bit unchanged.

A `SiteBank` holds the bases of every loaded mode (slot) at one site, side by side in one tensor
W = [U_1 | U_2 | ...] and, as column views of it, one (w, r_s) basis per slot. A flattened batch
whose tokens use different slots is projected group by group: the rows are grouped by slot once
per step (`SlotGroups`, reused by every site), and each group costs two matmuls with its own
slot's basis only. A token's cost is therefore proportional to its own slot's rank, however many
other modes and compositions are loaded; only the number of distinct slots in the batch adds a
small fixed cost per group.

That grouping reads the slots on the host and gives data-dependent shapes, so it cannot be captured
in a CUDA graph or compiled whole (torch.compile fullgraph). `project_routed` is the capture-safe
form: tensors only, fixed shapes, every row times every column of W masked to its own slot's
columns (a token pays for the whole bank's rank, not its own), reading the step's route from
persistent `RouteBuffers` that each step overwrites in place.
"""
from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass
from functools import cached_property

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
class _Plan:
    """The rows one site projects, in the order they are computed: `segments` are (slot, start,
    stop) runs of that order; the rows are either the contiguous range `span` of the batch or the
    row indices `order` (host)."""

    segments: tuple[tuple[int, int, int], ...]
    span: tuple[int, int] | None
    order: torch.Tensor | None
    on_device: dict

    def index(self, device: torch.device) -> torch.Tensor:
        idx = self.on_device.get(device)
        if idx is None:  # once per step and device (a host-to-device copy, never a sync)
            idx = self.on_device[device] = self.order.to(device, non_blocking=True)
        return idx


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference-mode tensors have no version counter
        return None


class SlotGroups:
    """The rows of one batch grouped by slot: which rows have a mode (`order`, sorted by slot,
    stable, so a request's tokens stay in order) and where each slot's run starts and ends
    (`slots`, `bounds`). Depends only on the rows' slots, so it is built once per step and reused
    by every site (every layer, K and V) and every bank.

    Building it reads the slots on the host. For a `slot` tensor on a GPU that is a device-to-host
    sync, which `SiteBank.apply` must not pay on every layer: a caller that has the step's slots on
    the host builds `SlotGroups(host_slot)` once and passes it as `groups=`; without it, `apply`
    builds the groups once and reuses them for later calls with the same slot tensor (one sync per
    step instead of one per layer; see `SlotGroups.of`). On the CPU none of this costs a sync.
    """

    def __init__(self, slot: torch.Tensor):
        host = slot.detach().to("cpu", torch.long, copy=True).reshape(-1)
        rows = torch.nonzero(host >= 0).flatten()
        keys = host[rows]
        perm = torch.argsort(keys, stable=True)
        slots, counts = torch.unique_consecutive(keys[perm], return_counts=True)
        bounds = [0]
        for c in counts.tolist():
            bounds.append(bounds[-1] + c)
        self.n = host.numel()
        self.slot = host  # a private copy: the content these groups were built from
        self.order = rows[perm]
        self.slots: tuple[int, ...] = tuple(slots.tolist())
        self.bounds: tuple[int, ...] = tuple(bounds)
        self._plans: dict[tuple[int, ...], _Plan] = {}

    _recent = threading.local()

    @classmethod
    def of(cls, slot: torch.Tensor) -> "SlotGroups":
        """The groups of `slot`, reusing the last ones built in this thread when they are still
        valid: on the CPU when the content is equal (a cheap host compare); on a device when it is
        the same tensor object, not modified in place since (its version counter; inference-mode
        tensors have none, so there an in-place change of the slot tensor between calls is not
        seen: pass `groups=` to be explicit)."""
        last = getattr(cls._recent, "last", None)
        if last is not None:
            ref, version, groups = last
            if slot.device.type == "cpu":
                if slot.shape == groups.slot.shape and slot.dtype == torch.long and torch.equal(slot, groups.slot):
                    return groups
            elif ref() is slot and version == _version(slot):
                return groups
        groups = cls(slot)
        cls._recent.last = (weakref.ref(slot), _version(slot), groups)
        return groups

    def plan(self, covers: tuple[bool, ...]) -> _Plan:
        """The rows a site projects: those whose slot covers the site (cached per coverage)."""
        key = tuple(s for s in self.slots if s < len(covers) and covers[s])
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        if self.slots and self.slots[-1] >= len(covers):
            raise IndexError(f"slot {self.slots[-1]} out of range for a bank of {len(covers)} slots")
        if key == self.slots:
            order, segments = self.order, tuple(zip(self.slots, self.bounds[:-1], self.bounds[1:]))
        else:
            parts, segs, at = [], [], 0
            for s, b0, b1 in zip(self.slots, self.bounds[:-1], self.bounds[1:]):
                if s in key:
                    parts.append(self.order[b0:b1])
                    segs.append((s, at, at + b1 - b0))
                    at += b1 - b0
            order = torch.cat(parts) if parts else self.order[:0]
            segments = tuple(segs)
        span = None
        if len(order) and int(order[-1]) - int(order[0]) + 1 == len(order) and bool((order.diff() == 1).all()):
            span = (int(order[0]), int(order[-1]) + 1)  # the rows are already one run in place: slice, no gather
        plan = _Plan(segments, span, None if span else order, {})
        self._plans[key] = plan
        return plan


@dataclass(frozen=True)
class SiteBank:
    """All slots' bases at one site. W: (w, R) with R the total rank; col_slot: (R,) the slot owning
    each column; covers: (S,) whether each slot projects this site at all. `bases[s]` is slot s's
    own basis (w, r_s), a view of W's columns (None where slot s skips the site); any (w, R) W
    works, `build` lays it out with each slot's columns contiguous in memory."""

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
        # W is stored transposed (W.T contiguous, (R, w)): each slot's basis is then one contiguous
        # block of memory, not r columns strided by the whole bank's R (with 256 slots loaded that
        # stride is ~100 KB, one page per row of a basis). `.to()` keeps these strides.
        Wt = torch.cat([b.T for b in present], dim=0).to(dtype).contiguous()
        return SiteBank(Wt.T, torch.cat(owners), covers)

    # Host-side layout, read once per SiteBank (for tensors on a GPU, one sync per bank, not per
    # step): the bank is built once per bank change and reused by every step.
    @cached_property
    def _covers(self) -> tuple[bool, ...]:
        return tuple(bool(c) for c in self.covers.tolist())

    @cached_property
    def _columns(self) -> tuple[slice | torch.Tensor | None, ...]:
        """Per slot, its columns of W: a slice when contiguous (as `build` lays them out)."""
        owner = self.col_slot.to("cpu")
        out = []
        for s, covered in enumerate(self._covers):
            if not covered:
                out.append(None)
                continue
            cols = torch.nonzero(owner == s).flatten()
            if len(cols) == 0 or int(cols[-1]) - int(cols[0]) + 1 == len(cols):
                start = int(cols[0]) if len(cols) else 0
                out.append(slice(start, start + len(cols)))
            else:
                out.append(cols)  # a host index: it indexes W on any device
        return tuple(out)

    def _slot_bases(self, W: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, ...]:
        """Per slot, (U, U.T) as views of W (a copy only for a hand-built W with interleaved columns)."""
        out = []
        for cols in self._columns:
            U = None if cols is None else W[:, cols]
            out.append(None if U is None else (U, U.T))
        return tuple(out)

    @cached_property
    def _bases(self) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, ...]:
        return self._slot_bases(self.W)

    @property
    def bases(self) -> list[torch.Tensor | None]:
        """Each slot's own basis (w, r_s) at this site, None where the slot skips it."""
        return [None if b is None else b[0] for b in self._bases]

    def apply(self, x: torch.Tensor, slot: torch.Tensor, strength: torch.Tensor,
              groups: SlotGroups | None = None) -> torch.Tensor:
        """Project rows x (N, ...) whose trailing dims flatten to w; slot (N,) long, NO_MODE for
        none; strength (N,). Rows without a mode, or whose slot skips this site, are unchanged
        (bit for bit; when no row is projected, x itself is returned). `groups`: `SlotGroups` of
        `slot`, built once per step by the caller (optional, see `SlotGroups`)."""
        shape = x.shape
        x2 = x.reshape(shape[0], math.prod(shape[1:]))  # (not -1: an empty batch has no inferable width)
        if groups is None:
            groups = SlotGroups.of(slot)
        elif groups.n != shape[0]:
            raise ValueError(f"groups are for {groups.n} rows, x has {shape[0]}")
        plan = groups.plan(self._covers)
        if not plan.segments:
            return x
        if self.W.device == x2.device and self.W.dtype == x2.dtype:
            bases = self._bases
        else:
            bases = self._slot_bases(self.W.to(device=x2.device, dtype=x2.dtype))
        a = strength.to(device=x2.device, dtype=x2.dtype)
        if plan.span is not None:
            lo, hi = plan.span
            xs, a = x2[lo:hi], a[lo:hi]
        else:
            idx = plan.index(x2.device)
            xs, a = x2.index_select(0, idx), a.index_select(0, idx)
        # One group per slot present: two matmuls with that slot's own basis. Chosen by measurement
        # on the CPU (bench/results/many_modes_projection.json): gathering every row's basis into one batched
        # matmul instead (no loop over groups, no host-side grouping) copies w x r values per row
        # and was 3-30x slower than this loop. Not measured on a GPU: there each group costs two
        # kernel launches, so a decode step with many distinct slots may favour the gather there.
        if torch.is_grad_enabled() and (xs.requires_grad or self.W.requires_grad):
            px = torch.cat([(xs[b0:b1] @ bases[s][0]) @ bases[s][1] for s, b0, b1 in plan.segments])
        else:
            px = torch.empty_like(xs)
            for s, b0, b1 in plan.segments:
                U, Ut = bases[s]
                torch.mm(torch.mm(xs[b0:b1], U), Ut, out=px[b0:b1])
        ys = xs + a[:, None] * (px - xs)
        if plan.span == (0, shape[0]):
            return ys.reshape(shape)
        out = x2.clone()
        if plan.span is not None:
            out[plan.span[0]:plan.span[1]] = ys
        else:
            out.index_copy_(0, plan.index(x2.device), ys)
        return out.reshape(shape)

    def apply_routed(self, x: torch.Tensor, slot: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
        """`project_routed` with this bank: `apply`'s result in the capture-safe masked form."""
        return project_routed(x, self.W, self.col_slot, self.covers, slot, strength)


def project_routed(x: torch.Tensor, W: torch.Tensor, col_slot: torch.Tensor, covers: torch.Tensor,
                   slot: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """`SiteBank.apply` (within float rounding) with no host reads, no data-dependent shapes and no
    Python branch on values, so it can be captured in a CUDA graph or compiled with fullgraph=True.
    Rows with NO_MODE, a slot not covering the site or strength 0 come out as x (x + 0 * (px - x));
    a slot out of range is left unchanged too (a captured op cannot raise; `apply` does). The
    `.to()`s are no-ops when W, col_slot and covers already live on x's device, as they must for a
    CUDA graph (a host-to-device copy cannot be captured)."""
    x2 = x.reshape(x.shape[0], math.prod(x.shape[1:]))
    W = W.to(device=x2.device, dtype=x2.dtype)
    covers = covers.to(x2.device)
    n_slots = covers.shape[0]
    on = (slot >= 0) & (slot < n_slots) & covers[slot.clamp(0, n_slots - 1)]
    alpha = torch.where(on, strength.to(x2.dtype), torch.zeros((), dtype=x2.dtype, device=x2.device))
    keep = (col_slot.to(x2.device)[None, :] == slot[:, None]).to(x2.dtype)  # (N, R): each row's own columns
    px = ((x2 @ W) * keep) @ W.T
    return (x2 + alpha[:, None] * (px - x2)).reshape(x.shape)


class RouteBuffers:
    """The per-token route (slot, strength) of a step in persistent tensors, allocated once on a
    device: a captured graph reads these very tensors, so each step writes its route into them in
    place (as vLLM's LoRA punica wrapper does with its token-to-adapter index buffers). Rows past
    the step's tokens get NO_MODE / 0, so padding rows of a captured batch are left unchanged."""

    def __init__(self, max_tokens: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.slot = torch.full((max_tokens,), NO_MODE, dtype=torch.long, device=device)
        self.strength = torch.zeros(max_tokens, dtype=dtype, device=device)

    def write(self, slot: torch.Tensor, strength: torch.Tensor) -> None:
        """Copy this step's (n,) slots and strengths into the first n rows (a blocking copy from the
        host: the caller may reuse its tensors at once)."""
        n = slot.shape[0]
        if n > self.slot.shape[0] or strength.shape != slot.shape:
            raise ValueError(f"a route of {n} tokens ({tuple(strength.shape)} strengths) does not fit "
                             f"buffers of {self.slot.shape[0]}")
        self.slot[:n].copy_(slot)
        self.slot[n:].fill_(NO_MODE)
        self.strength[:n].copy_(strength)
        self.strength[n:].zero_()


class SiteBuffers:
    """One site's bank in persistent tensors of a fixed capacity (`max_rank` columns, `max_slots`
    slots), allocated once on a device: what `project_routed` reads inside a captured graph, so a
    bank change (a mode loaded, evicted or composed) is copied into these very tensors. Columns past
    the bank's belong to no slot and slots past its cover nothing, so they project nothing."""

    FREE = -2  # the owner of an unused column: never a row's slot (NO_MODE is -1)

    def __init__(self, width: int, max_rank: int, max_slots: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.W = torch.zeros(width, max_rank, dtype=dtype, device=device)
        self.col_slot = torch.full((max_rank,), self.FREE, dtype=torch.long, device=device)
        self.covers = torch.zeros(max_slots, dtype=torch.bool, device=device)

    def write(self, bank: SiteBank | None) -> None:
        """Copy `bank` in place (None: this site projects nothing); ValueError if it does not fit."""
        (width, max_rank), max_slots = self.W.shape, self.covers.shape[0]
        rank, slots = (0, 0) if bank is None else (bank.W.shape[1], bank.covers.shape[0])
        if bank is not None and (bank.W.shape[0] != width or rank > max_rank or slots > max_slots):
            raise ValueError(f"a bank of width {bank.W.shape[0]}, rank {rank} and {slots} slots does not fit "
                             f"site buffers of width {width}, rank {max_rank} and {max_slots} slots")
        if bank is not None:
            self.W[:, :rank].copy_(bank.W)
            self.col_slot[:rank].copy_(bank.col_slot)
            self.covers[:slots].copy_(bank.covers)
        self.W[:, rank:].zero_()
        self.col_slot[rank:].fill_(self.FREE)
        self.covers[slots:].fill_(False)

    def apply(self, x: torch.Tensor, route: RouteBuffers) -> torch.Tensor:
        """`project_routed` of rows x (the first x.shape[0] of the route) with the bank written last."""
        n = x.shape[0]
        return project_routed(x, self.W, self.col_slot, self.covers, route.slot[:n], route.strength[:n])
