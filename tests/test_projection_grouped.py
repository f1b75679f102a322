"""The grouped `SiteBank.apply`: each row projected with its own slot's basis only, equal to the
reference `project()` per row and to the masked form `SiteBank.apply_routed` (every loaded slot's
columns, masked: the capture-safe op, tests/test_projection_capture.py)."""
import pytest
import torch

from spd_engine.bank import ProjectionBank
from spd_engine.projection import NO_MODE, SiteBank, SlotGroups, orthonormal_union, project


def _basis(w: int, r: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(w, r, generator=g, dtype=torch.float64)).Q.to(dtype)


def _per_row(slot_bases, x, slot, strength):
    """The reference: `project()` row by row with the row's own basis (None/NO_MODE: unchanged)."""
    out = []
    for row, s, a in zip(x, slot.tolist(), strength.tolist()):
        basis = slot_bases[s] if s >= 0 else None
        out.append(row if basis is None else project(row.reshape(-1), basis.to(x.dtype), a).reshape(row.shape))
    return torch.stack(out)


TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mixed_batch_with_compositions_strengths_no_mode_and_skipped_sites_equals_per_row_project(dtype):
    w = 24
    A, B, C = _basis(w, 6, 1, dtype), _basis(w, 3, 2, dtype), _basis(w, 10, 3, dtype)
    # slots: A, B, C, A+B (a composition), a slot skipping this site, B+C
    slot_bases = [A, B, C, orthonormal_union([A, B]), None, orthonormal_union([B, C])]
    bank = SiteBank.build(slot_bases, dtype=dtype)
    g = torch.Generator().manual_seed(7)
    n = 40
    x = torch.randn(n, w, generator=g, dtype=dtype)
    slot = torch.randint(-1, len(slot_bases), (n,), generator=g)
    strength = torch.rand(n, generator=g, dtype=dtype)
    strength[::5] = 1.0
    strength[1::7] = 0.0
    out = bank.apply(x, slot, strength)
    want = _per_row(slot_bases, x, slot, strength)
    assert out.dtype == dtype
    assert torch.allclose(out, want, atol=TOL[dtype], rtol=0)
    assert torch.allclose(out, bank.apply_routed(x, slot, strength), atol=TOL[dtype], rtol=0)
    untouched = (slot == NO_MODE) | (slot == 4)
    assert untouched.any() and torch.equal(out[untouched], x[untouched])  # bit for bit
    zero = strength == 0
    assert torch.equal(out[zero], x[zero])


def test_a_mixed_batch_equals_each_row_projected_alone():
    A, B = _basis(16, 4, 4), _basis(16, 7, 5)
    bank = SiteBank.build([A, B, orthonormal_union([A, B])])
    x = torch.randn(9, 16)
    slot = torch.tensor([2, 0, NO_MODE, 1, 1, 0, 2, NO_MODE, 1])
    strength = torch.tensor([1.0, 0.25, 1.0, 1.0, 0.5, 1.0, 0.75, 0.0, 1.0])
    mixed = bank.apply(x, slot, strength)
    for i in range(9):
        solo = bank.apply(x[i:i + 1], slot[i:i + 1], strength[i:i + 1])
        assert torch.allclose(mixed[i], solo[0], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(6))
def test_equals_the_masked_form_on_random_banks_and_batches(seed, dtype):
    g = torch.Generator().manual_seed(100 + seed)
    w = int(torch.randint(4, 40, (1,), generator=g))
    n_slots = int(torch.randint(1, 12, (1,), generator=g))
    slot_bases = []
    for s in range(n_slots):
        skip = s > 0 and torch.rand(1, generator=g).item() < 0.2
        slot_bases.append(None if skip else _basis(w, int(torch.randint(1, w + 1, (1,), generator=g)), seed * 50 + s))
    bank = SiteBank.build(slot_bases, dtype=dtype)
    n = int(torch.randint(1, 200, (1,), generator=g))
    x = torch.randn(n, w, generator=g, dtype=dtype)
    slot = torch.randint(-1, n_slots, (n,), generator=g)
    strength = torch.rand(n, generator=g, dtype=dtype)
    out = bank.apply(x, slot, strength)
    assert torch.allclose(out, bank.apply_routed(x, slot, strength), atol=TOL[dtype] * 10, rtol=0)
    assert torch.allclose(out, _per_row(slot_bases, x, slot, strength), atol=TOL[dtype] * 10, rtol=0)


def test_float64_rows_with_a_float32_bank_project_in_float64():
    A = _basis(12, 5, 8)
    bank = SiteBank.build([A])
    x = torch.randn(5, 12, dtype=torch.float64)
    out = bank.apply(x, torch.zeros(5, dtype=torch.long), torch.ones(5, dtype=torch.float64))
    assert out.dtype == torch.float64
    assert torch.allclose(out, project(x, A.double()), atol=1e-12)


def test_bfloat16_rows_project_within_bfloat16_rounding_of_the_float64_result_and_no_mode_rows_stay_bit_exact():
    """A bfloat16 model's K/V (the CPU default where the CPU has BF16 kernels): the result stays in
    bfloat16 and is the exact projection within one bfloat16 rounding of the row's norm."""
    w = 192  # SmolLM2-135M's K/V width per layer
    A, B = _basis(w, 96, 11), _basis(w, 16, 12)
    slot_bases = [A, B, orthonormal_union([A, B])]
    bank = SiteBank.build(slot_bases)
    g = torch.Generator().manual_seed(13)
    x64 = torch.randn(64, w, generator=g, dtype=torch.float64) * 3
    x = x64.to(torch.bfloat16)
    slot = torch.randint(-1, 3, (64,), generator=g)
    strength = torch.rand(64, generator=g, dtype=torch.float64)
    strength[::4] = 1.0
    out = bank.apply(x, slot, strength.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    want = _per_row([b.double() for b in slot_bases], x.double(), slot, strength.to(torch.bfloat16).double())
    err = ((out.double() - want).abs() / x.double().norm(dim=1, keepdim=True)).max().item()
    assert err < 2 ** -8, f"error {err:.5f} of the row's norm exceeds one bfloat16 rounding"
    none = slot == NO_MODE
    assert none.any() and torch.equal(out[none], x[none])


def test_head_shaped_rows_and_the_old_call_form_with_explicit_groups():
    A, B = _basis(12, 5, 9), _basis(12, 2, 10)
    bank = SiteBank.build([A, None, B])
    x = torch.randn(8, 3, 4)
    slot = torch.tensor([0, 2, 2, NO_MODE, 1, 0, 0, 2])
    strength = torch.full((8,), 0.8)
    implicit = bank.apply(x, slot, strength)
    explicit = bank.apply(x, slot, strength, groups=SlotGroups(slot))
    assert implicit.shape == x.shape
    assert torch.equal(implicit, explicit)
    assert torch.allclose(implicit, bank.apply_routed(x, slot, strength), atol=1e-6)
    assert torch.equal(implicit[3], x[3]) and torch.equal(implicit[4], x[4])
    with pytest.raises(ValueError):
        bank.apply(x, slot, strength, groups=SlotGroups(slot[:4]))


def test_groups_are_rebuilt_when_the_slots_change_in_place():
    A, B = _basis(8, 3, 11), _basis(8, 2, 12)
    bank = SiteBank.build([A, B])
    x, strength = torch.randn(4, 8), torch.ones(4)
    slot = torch.tensor([0, 0, 1, 1])
    first = bank.apply(x, slot, strength)
    slot[:] = torch.tensor([1, NO_MODE, 0, 1])
    second = bank.apply(x, slot, strength)
    assert torch.allclose(first, bank.apply_routed(x, torch.tensor([0, 0, 1, 1]), strength), atol=1e-6)
    assert torch.allclose(second, bank.apply_routed(x, slot, strength), atol=1e-6)
    assert torch.equal(second[1], x[1])


def test_groups_sort_rows_by_slot_and_keep_each_slots_rows_in_order():
    g = SlotGroups(torch.tensor([2, NO_MODE, 0, 2, 0, NO_MODE, 1]))
    assert g.n == 7 and g.slots == (0, 1, 2) and g.bounds == (0, 2, 3, 5)
    assert g.order.tolist() == [2, 4, 6, 0, 3]
    plan = g.plan((True, False, True))  # slot 1 skips this site
    assert plan.segments == ((0, 0, 2), (2, 2, 4)) and plan.order.tolist() == [2, 4, 0, 3]
    run = SlotGroups(torch.tensor([NO_MODE, 1, 1, 3, NO_MODE])).plan((True, True, True, True))
    assert run.span == (1, 4) and run.order is None  # already one run in place: sliced, not gathered
    with pytest.raises(IndexError):
        g.plan((True, True))


def test_one_slot_for_the_whole_batch_and_no_projected_row():
    A = _basis(8, 4, 13)
    bank = SiteBank.build([A, None])
    x = torch.randn(6, 8)
    out = bank.apply(x, torch.zeros(6, dtype=torch.long), torch.ones(6))
    assert torch.allclose(out, project(x, A), atol=1e-6)
    assert out.data_ptr() != x.data_ptr()
    assert bank.apply(x, torch.full((6,), NO_MODE), torch.ones(6)) is x  # nothing projected: x itself
    assert bank.apply(x, torch.ones(6, dtype=torch.long), torch.ones(6)) is x  # slot 1 skips the site
    empty = torch.empty(0, 8)
    assert bank.apply(empty, torch.empty(0, dtype=torch.long), torch.empty(0)).shape == (0, 8)


def test_per_slot_bases_are_views_of_W_and_survive_a_rebuild_from_the_fields():
    A, B = _basis(10, 3, 14), _basis(10, 4, 15)
    bank = SiteBank.build([A, None, B])
    assert torch.equal(bank.bases[0], A) and bank.bases[1] is None and torch.equal(bank.bases[2], B)
    assert bank.bases[2].data_ptr() == bank.W[:, 3:].data_ptr()  # no copy
    assert torch.equal(bank.W, torch.cat([A, B], dim=1)) and bank.W.T.is_contiguous()  # each slot's block contiguous
    assert bank.W.to(torch.float64).T.is_contiguous()  # as the vLLM plugin moves it: layout kept
    again = SiteBank(bank.W.to(torch.float64), bank.col_slot, bank.covers)  # as the vLLM plugin rebuilds it
    assert torch.allclose(again.bases[2], B.double())
    # a hand-built bank whose slot columns are interleaved still projects each row with its own
    W = torch.cat([A[:, :1], B[:, :2], A[:, 1:], B[:, 2:]], dim=1)
    mixed = SiteBank(W, torch.tensor([0, 1, 1, 0, 0, 1, 1]), torch.tensor([True, True]))
    x, slot = torch.randn(5, 10), torch.tensor([0, 1, 1, 0, NO_MODE])
    assert torch.allclose(mixed.apply(x, slot, torch.ones(5)), _per_row([A, B], x, slot, torch.ones(5)), atol=1e-6)


def test_gradients_flow_through_the_grouped_apply():
    A, B = _basis(8, 3, 16), _basis(8, 5, 17)
    bank = SiteBank.build([A, B])
    x = torch.randn(5, 8, requires_grad=True)
    slot, strength = torch.tensor([0, 1, NO_MODE, 1, 0]), torch.full((5,), 0.5)
    bank.apply(x, slot, strength).sum().backward()
    y = x.detach().clone().requires_grad_(True)
    bank.apply_routed(y, slot, strength).sum().backward()
    assert torch.allclose(x.grad, y.grad, atol=1e-6)


def test_projection_bank_passes_the_steps_groups_to_every_site():
    bank = ProjectionBank.__new__(ProjectionBank)  # only its site banks matter here
    bank.sites = {(0, "k"): SiteBank.build([_basis(8, 3, 18)])}
    x, slot = torch.randn(3, 8), torch.tensor([0, NO_MODE, 0])
    groups = SlotGroups(slot)
    assert torch.equal(bank.apply((0, "k"), x, slot, torch.ones(3), groups), bank.apply((0, "k"), x, slot, torch.ones(3)))
    assert bank.apply((1, "v"), x, slot, torch.ones(3), groups) is x
