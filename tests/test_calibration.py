"""Method correctness: calibration finds the subspace the spec defines."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from spd_engine import models
from spd_engine.calibrate import CalibrationConfig, batches, calibrate, choose_rank, site_rows
from spd_engine.subspace import principal_angles
from spd_engine.tasks import Example

EXAMPLES = [
    Example(id=f"e{i}", prompt=f"What is {a} plus {b}?", answer=f"{a} plus {b} is {a + b}. The answer is {a + b}.")
    for i, (a, b) in enumerate([(3, 4), (12, 30), (7, 8), (25, 17), (9, 9), (41, 2)])
]


def _tiny(tiny_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_gram_route_equals_svd_of_the_explicit_gradient_matrix(tiny_path, tokenizer):
    model, info = _tiny(tiny_path), models.info(tiny_path)
    cfg = CalibrationConfig(layers=[0, 1], rank=6, batch_size=2)
    pack = calibrate(model, tokenizer, info, "math", EXAMPLES, "gram", cfg)
    sites = [(0, "k"), (0, "v"), (1, "k"), (1, "v")]
    rows = {s: [] for s in sites}
    for ids, mask, spans in batches(tokenizer, "math", EXAMPLES, 3):  # other batching, same rows
        for s, r in site_rows(model, ids, mask, spans, sites, "gradient").items():
            rows[s].append(r.double())
    for s in sites:
        G = torch.cat(rows[s])
        _, sv, vh = torch.linalg.svd(G, full_matrices=False)
        U = vh[:6].T
        cos = torch.linalg.svdvals(U.T @ pack.bases[s][0].double())
        assert cos.min() > 1 - 1e-4, f"{s}: principal angles not ~0 (cos {cos.min():.6f})"
        assert torch.allclose(pack.spectra[s][0].double(), sv, rtol=1e-3, atol=1e-6)


def test_calibration_recovers_the_only_V_directions_that_affect_the_span_loss(tiny_path, tokenizer):
    """If o_proj reads V only through a known subspace Q, every gradient w.r.t. V lies in Q, so a
    rank-|Q| calibration must return exactly span(Q)."""
    model, info = _tiny(tiny_path), models.info(tiny_path)
    attn = model.model.layers[1].self_attn
    n_heads, n_kv, hd = 4, 2, 16
    g = torch.Generator().manual_seed(7)
    Q = [torch.linalg.qr(torch.randn(hd, 3, generator=g)).Q for _ in range(n_kv)]
    W = attn.o_proj.weight.data  # (hidden, n_heads * hd): head h reads V of kv head h // 2
    for h in range(n_heads):
        q = Q[h // (n_heads // n_kv)]
        W[:, h * hd : (h + 1) * hd] = W[:, h * hd : (h + 1) * hd] @ q @ q.T
    pack = calibrate(model, tokenizer, info, "math", EXAMPLES, "known",
                     CalibrationConfig(layers=[1], kinds=("v",), rank=6))
    want = torch.block_diag(*Q)  # layer granularity: the direct sum over KV heads
    cos = torch.linalg.svdvals(want.double().T @ pack.bases[(1, "v")][0].double())
    assert cos.min() > 1 - 1e-5
    # and the spectrum has nothing beyond those 6 directions
    s = pack.spectra[(1, "v")][0]
    assert s[6:].max() < 1e-4 * s[0]


def test_head_granularity_gives_one_basis_per_kv_head(tiny_path, tokenizer):
    pack = calibrate(_tiny(tiny_path), tokenizer, models.info(tiny_path), "math", EXAMPLES, "heads",
                     CalibrationConfig(layers=[1], granularity="head"))
    assert [b.shape for b in pack.bases[(1, "k")]] == [torch.Size([16, 8])] * 2  # d/2 of head_dim 16


def test_rank_rules():
    ev = torch.tensor([8.0, 1.0, 0.5, 0.5, 0.0, 0.0])
    assert choose_rank(ev, CalibrationConfig()) == 3  # d/2
    assert choose_rank(ev, CalibrationConfig(rank=2)) == 2
    assert choose_rank(ev, CalibrationConfig(energy=0.8)) == 1
    assert choose_rank(ev, CalibrationConfig(energy=0.9)) == 2
    assert choose_rank(ev, CalibrationConfig(energy=1.0)) == 4


def test_ablation_subspaces_have_the_requested_rank_and_differ_from_the_gradient_one(tiny_path, tokenizer):
    model, info = _tiny(tiny_path), models.info(tiny_path)
    grad = calibrate(model, tokenizer, info, "math", EXAMPLES, "grad", CalibrationConfig(layers=[1], rank=4))
    rand = calibrate(model, tokenizer, info, "math", EXAMPLES, "rand", CalibrationConfig(layers=[1], rank=4, method="random"))
    pca = calibrate(model, tokenizer, info, "math", EXAMPLES, "pca", CalibrationConfig(layers=[1], rank=4, method="activation-pca"))
    for p in (rand, pca):
        assert p.manifest.ranks == {"1.k": [4], "1.v": [4]}
        angles = principal_angles(grad, p)["1.k.g0"]
        assert max(angles) > 1.0  # a genuinely different subspace
    with pytest.raises(ValueError, match="fixed rank"):
        calibrate(model, tokenizer, info, "math", EXAMPLES, "r", CalibrationConfig(method="random", energy=0.9))


def test_bad_calibration_settings_are_refused(tiny_path, tokenizer):
    model, info = _tiny(tiny_path), models.info(tiny_path)
    with pytest.raises(ValueError, match="layers \\[5\\] do not exist"):
        calibrate(model, tokenizer, info, "math", EXAMPLES, "x", CalibrationConfig(layers=[5]))
    with pytest.raises(ValueError, match="rank 99"):
        calibrate(model, tokenizer, info, "math", EXAMPLES, "x", CalibrationConfig(rank=99))
