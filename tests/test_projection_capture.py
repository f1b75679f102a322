"""The capture-safe projection (`project_routed` reading `RouteBuffers`): compiled whole
(torch.compile fullgraph=True, the CPU stand-in for a CUDA graph: both need one graph of tensor ops
with no host reads), then fed new routes written in place into the same buffers, it gives eager
`SiteBank.apply`'s results for each route, without recompiling."""
import pytest
import torch
import torch._dynamo

from spd_engine.projection import NO_MODE, RouteBuffers, SiteBank, SiteBuffers, orthonormal_union, project_routed

W_, N = 24, 12  # width, rows (max tokens)


def _basis(w: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(w, r, generator=g, dtype=torch.float64)).Q.float()


@pytest.fixture(scope="module")
def bank() -> SiteBank:
    A, B, C = _basis(W_, 6, 1), _basis(W_, 3, 2), _basis(W_, 8, 3)
    return SiteBank.build([A, B, None, orthonormal_union([A, C])])  # slot 2 does not cover this site


# Routes of N tokens (some shorter: the buffers' tail rows become NO_MODE / 0): slots changing,
# strengths changing, NO_MODE rows, slot 2 that skips the site, strength-0 rows.
ROUTES = [
    ([0, 0, 1, 1, NO_MODE, 3, 3, 2, 0, 1, 3, NO_MODE], [1.0, 0.5, 1.0, 0.0, 1.0, 1.0, 0.3, 1.0, 0.9, 1.0, 1.0, 1.0]),
    ([3, 3, 3, 0, 0, NO_MODE, 1, 1, 2, 2, 0, 3], [1.0, 1.0, 0.2, 1.0, 0.0, 1.0, 0.7, 1.0, 1.0, 0.5, 1.0, 1.0]),
    ([1, NO_MODE, 2, 0, 3, 1, 0], [0.6, 1.0, 1.0, 1.0, 0.4, 0.0, 1.0]),
    ([NO_MODE] * 3 + [2] * 3 + [0] * 6, [1.0] * 12),
]


def test_compiled_routed_op_equals_eager_apply_over_routes_written_in_place_without_recompiling(bank):
    x = torch.randn(N, W_, generator=torch.Generator().manual_seed(0))
    buf = RouteBuffers(N)

    def routed(x: torch.Tensor) -> torch.Tensor:  # reads the bank and the buffers through the closure
        return project_routed(x, bank.W, bank.col_slot, bank.covers, buf.slot, buf.strength)

    torch._dynamo.reset()
    # inductor (the default backend): about 27 s to compile on a 2-core CPU with a cold cache, 5 s
    # warm. dynamic=False: one static-shape graph, as a CUDA graph is.
    compiled = torch.compile(routed, fullgraph=True, dynamic=False)
    outs = []
    for i, (slots, strengths) in enumerate(ROUTES):
        slot, strength = torch.tensor(slots), torch.tensor(strengths)
        buf.write(slot, strength)  # in place: same tensors, new values
        pad_slot = torch.cat([slot, torch.full((N - len(slot),), NO_MODE)])
        pad_strength = torch.cat([strength, torch.zeros(N - len(slot))])
        if i == 0:
            out = compiled(x)  # the one compilation
        else:
            with torch._dynamo.config.patch(error_on_recompile=True):
                out = compiled(x)
        want = bank.apply(x, pad_slot, pad_strength)
        assert torch.allclose(out, want, atol=1e-5, rtol=0), (i, float((out - want).abs().max()))
        untouched = (pad_slot == NO_MODE) | (pad_slot == 2) | (pad_strength == 0)
        assert untouched.any()
        assert float((out[untouched] - x[untouched]).abs().max()) <= 1e-6
        assert not torch.allclose(out[~untouched], x[~untouched], atol=1e-3)  # projected rows really move
        outs.append(out)
    # the routes really differ: a compiled graph that kept route 1's values would fail above
    for a, b in zip(outs, outs[1:]):
        assert (a - b).abs().max() > 1e-2


def test_route_buffers_write_in_place_and_refuse_a_route_that_does_not_fit():
    buf = RouteBuffers(4)
    slot_ptr, strength_ptr = buf.slot.data_ptr(), buf.strength.data_ptr()
    buf.write(torch.tensor([1, 0, 2, 1]), torch.tensor([1.0, 0.5, 1.0, 1.0]))
    buf.write(torch.tensor([3, 1]), torch.tensor([0.25, 1.0]))
    assert buf.slot.tolist() == [3, 1, NO_MODE, NO_MODE] and buf.strength.tolist() == [0.25, 1.0, 0.0, 0.0]
    assert (buf.slot.data_ptr(), buf.strength.data_ptr()) == (slot_ptr, strength_ptr)
    with pytest.raises(ValueError):
        buf.write(torch.zeros(5, dtype=torch.long), torch.ones(5))
    with pytest.raises(ValueError):
        buf.write(torch.zeros(2, dtype=torch.long), torch.ones(3))


def test_routed_op_leaves_an_out_of_range_slot_unchanged_where_apply_refuses(bank):
    x = torch.randn(3, W_)
    slot, strength = torch.tensor([0, 7, NO_MODE]), torch.ones(3)
    out = bank.apply_routed(x, slot, strength)
    assert torch.equal(out[1:], x[1:])
    with pytest.raises(IndexError):
        bank.apply(x, slot, strength)


def test_compiled_routed_op_follows_banks_written_in_place_into_site_buffers_without_recompiling():
    """The other half of a captured route: the bank too lives in persistent tensors (fixed capacity),
    so modes loaded or evicted between steps are served by the same compiled graph."""
    A, B, C, D = _basis(W_, 6, 1), _basis(W_, 3, 2), _basis(W_, 8, 3), _basis(W_, 5, 4)
    banks = [SiteBank.build([A, B, None, orthonormal_union([A, C])]),  # 4 slots, rank 6+3+14
             SiteBank.build([D]),  # a smaller bank after evictions: 1 slot, rank 5
             SiteBank.build([C, None, D, A, B])]  # 5 slots, rank 22
    x = torch.randn(N, W_, generator=torch.Generator().manual_seed(0))
    site, route = SiteBuffers(W_, max_rank=24, max_slots=6), RouteBuffers(N)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: site.apply(x, route), fullgraph=True, dynamic=False)
    outs = []
    for i, (bank, (slots, strengths)) in enumerate(zip(banks, ROUTES)):
        slots = [s % bank.covers.shape[0] if s != NO_MODE else s for s in slots]  # slots this bank has
        slot, strength = torch.tensor(slots), torch.tensor(strengths)
        site.write(bank)
        route.write(slot, strength)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            out = compiled(x)
        want = bank.apply(x, route.slot, route.strength)
        assert torch.allclose(out, want, atol=1e-5, rtol=0), (i, float((out - want).abs().max()))
        assert not torch.allclose(out, x, atol=1e-3)
        outs.append(out)
    for a, b in zip(outs, outs[1:]):
        assert (a - b).abs().max() > 1e-2  # a graph holding an earlier bank would fail above
    site.write(None)
    assert torch.equal(compiled(x), x)  # no bank: nothing projected
    with pytest.raises(ValueError):
        site.write(SiteBank.build([_basis(W_, 20, 5), _basis(W_, 8, 6)]))  # rank 28 > 24


def test_a_captured_bank_holds_one_steps_capabilities_and_projects_as_the_bank_does():
    """`CapturedBank` (what the engine plugin's captured route reads): the step's capabilities in
    the buffers, each row projected as `ProjectionBank.apply` does with the bank's own slots; more
    capabilities or columns than the capacity do not fit (the plugin then runs the step eagerly)."""
    from pathlib import Path

    from spd_engine.bank import CapturedBank, ProjectionBank
    from spd_engine.calibrate import CalibrationConfig, calibrate
    from spd_engine.models import ModelInfo

    info = ModelInfo(Path("/nonexistent"), "test-model", n_layers=4, n_kv_heads=2, head_dim=4)
    packs = [calibrate(None, None, info, "math", [], name, CalibrationConfig(method="random", rank=r, layers=ls, seed=i))
             for i, (name, r, ls) in enumerate([("a", 2, [1, 3]), ("b", 3, [1]), ("c", 2, [2])])]
    bank = ProjectionBank({p.name: p for p in packs}).with_capability(("a", "b"))
    captured = CapturedBank(4, 8, max_slots=2, max_rank=5, device=torch.device("cpu"), dtype=torch.float32)
    pointers = [b.W.data_ptr() for b in captured.buffers.values()]
    assert captured.load(bank, [("a",), ("b",), ("c",)]) is None  # 3 capabilities > 2 slots
    assert captured.load(bank, [("b",), ("a", "b")]) is None  # layer 1: rank 3 + 5 (a's 2 joined with b's 3) > 5
    slots = captured.load(bank, [("a",), ("b",)])
    assert slots == {("a",): 0, ("b",): 1}
    captured.buffers[(0, "k")].W[0, 0] = 7.0  # a marker that rewriting the buffers would erase
    assert captured.load(bank, [("b",), ("a",), ("a",)]) == slots  # the same capabilities, another order
    assert captured.buffers[(0, "k")].W[0, 0] == 7.0  # nothing rewritten
    captured.buffers[(0, "k")].W[0, 0] = 0.0  # (no pack covers layer 0)
    caps = [("a",), ("a",), ("b",), (), ("b",)]
    route = RouteBuffers(8)
    route.write(torch.tensor([slots[c] if c else NO_MODE for c in caps]), torch.tensor([1.0, 0.5, 1.0, 1.0, 0.25]))
    own_slot = torch.tensor([bank.slot(c) for c in caps])
    for layer in range(4):
        key, value = torch.randn(5, 2, 4), torch.randn(5, 2, 4)
        k, v = captured.apply(layer, key, value, route)
        for kind, x, got in (("k", key, k), ("v", value, v)):
            want = bank.apply((layer, kind), x, own_slot, route.strength[:5])
            assert torch.allclose(got, want, atol=1e-6), (layer, kind)
        if layer == 1:
            assert not torch.allclose(k, key, atol=1e-3)  # a and b both project layer 1
    assert [b.W.data_ptr() for b in captured.buffers.values()] == pointers  # the same tensors throughout
