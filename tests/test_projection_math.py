"""Method correctness: the projection arithmetic and the bank that batches it."""
import torch

from spd_engine.projection import NO_MODE, SiteBank, orthonormal_union, project


def _basis(w: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(w, r, generator=g)).Q


def test_projection_matrix_is_idempotent_and_basis_orthonormal():
    U = _basis(32, 8, 0)
    P = U @ U.T
    assert torch.allclose(U.T @ U, torch.eye(8), atol=1e-5)
    assert torch.allclose(P @ P, P, atol=1e-5)


def test_strength_zero_leaves_rows_bit_identical_and_strength_one_is_P_x():
    U = _basis(32, 8, 0)
    x = torch.randn(10, 32)
    bank = SiteBank.build([U])
    slot = torch.zeros(10, dtype=torch.long)
    assert torch.equal(bank.apply(x, slot, torch.zeros(10)), x)
    assert torch.allclose(bank.apply(x, slot, torch.ones(10)), x @ U @ U.T, atol=1e-5)
    half = bank.apply(x, slot, torch.full((10,), 0.5))
    assert torch.allclose(half, x + 0.5 * (x @ U @ U.T - x), atol=1e-5)


def test_mixed_rows_get_each_their_own_slot_and_rows_without_mode_are_untouched():
    A, B = _basis(32, 8, 1), _basis(32, 4, 2)
    bank = SiteBank.build([A, B])
    x = torch.randn(6, 32)
    slot = torch.tensor([0, 1, NO_MODE, 1, 0, NO_MODE])
    strength = torch.tensor([1.0, 0.3, 1.0, 1.0, 0.0, 0.7])  # strength of a row without mode is ignored
    out = bank.apply(x, slot, strength)
    ref = [project(x[0], A, 1.0), project(x[1], B, 0.3), x[2], project(x[3], B, 1.0), x[4], x[5]]
    for got, want in zip(out, ref):
        assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(out[2], x[2]) and torch.equal(out[4], x[4]) and torch.equal(out[5], x[5])


def test_a_slot_that_skips_a_site_leaves_its_rows_unchanged_there():
    A = _basis(16, 4, 3)
    bank = SiteBank.build([None, A])
    x = torch.randn(2, 16)
    out = bank.apply(x, torch.tensor([0, 1]), torch.ones(2))
    assert torch.equal(out[0], x[0])
    assert torch.allclose(out[1], project(x[1], A), atol=1e-5)


def test_composition_projects_onto_the_span_of_the_union():
    A, B = _basis(16, 3, 4), _basis(16, 3, 5)
    U = orthonormal_union([A, B, A])  # a repeated mode adds nothing
    assert U.shape == (16, 6)
    assert torch.allclose(U.T @ U, torch.eye(6), atol=1e-5)
    for v in (A, B):  # both spans are inside the union: P_union leaves them fixed
        assert torch.allclose(U @ U.T @ v, v, atol=1e-5)


def test_head_rows_layout_matches_flat_rows():
    """A bank accepts (N, heads, head_dim) rows as vLLM has them, same result as flat rows."""
    U = _basis(12, 5, 6)
    bank = SiteBank.build([U])
    x = torch.randn(4, 3, 4)
    slot, a = torch.zeros(4, dtype=torch.long), torch.ones(4)
    assert torch.allclose(bank.apply(x, slot, a).reshape(4, 12), bank.apply(x.reshape(4, 12), slot, a))
