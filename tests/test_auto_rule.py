"""The capability-auto rule (spd_engine.auto): the share each mode's basis holds of a prompt's
centred rows, the choice with its minimum share, and the decisions kept per request and key."""
from __future__ import annotations

import torch

from spd_engine.auto import AutoConfig, Decision, Decisions, choose, site_energy
from spd_engine.projection import SiteBank


def _basis(w: int, r: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(w, r, generator=torch.Generator().manual_seed(seed)))[0]


def test_site_energy_is_each_slots_share_of_the_centred_rows():
    w, n = 12, 9
    bases = [_basis(w, 3, 0), None, _basis(w, 5, 1)]
    bank = SiteBank.build(bases)
    x = torch.randn(n, w) + 5.0  # a large shared component, removed by centring
    captured, total = site_energy(x, bank)
    c = x - x.mean(0)
    assert torch.allclose(total, c.square().sum())
    for s, U in enumerate(bases):
        want = 0.0 if U is None else (c @ U).square().sum()
        assert torch.allclose(captured[s], torch.as_tensor(want), rtol=1e-5)
    raw, _ = site_energy(x, bank, centered=False)
    assert not torch.allclose(raw, captured)  # centring changes what is measured


def test_choose_takes_the_largest_share_above_the_minimum():
    assert choose({"a": 0.2, "b": 0.5}, AutoConfig()) == ("b",)
    assert choose({"a": 0.2, "b": 0.5}, AutoConfig(min_share=0.6)) == ()
    assert choose({"a": 0.0}, AutoConfig()) == () and choose({}, AutoConfig()) == ()


def test_a_request_served_from_the_prefix_cache_takes_the_decision_of_its_key():
    d = Decisions(max_keys=2)
    first = Decision(("math",), {"math": 0.3}, 15)
    d.put("r1", "k1", first)
    assert d.get("r2", "k1") is first and d.get("r3", "other") is None
    d.keep_only({"r2"})
    assert set(d.by_request) == {"r2"}
    d.put("r4", "k2", first)
    d.put("r5", "k3", first)
    assert list(d.by_key) == ["k2", "k3"]  # least recently used key evicted
