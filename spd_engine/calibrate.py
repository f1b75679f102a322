"""Phase 1: calibration -> capability subspace.

Loss: mean next-token NLL over each example's correctness-span tokens (teacher-forced on prompt +
gold answer). Rows: the gradient of that loss w.r.t. K and V at the KV-cache site, one row per
token position (all positions), width n_kv_heads * head_dim. Subspace: the top-r eigenvectors of
the Gram matrix G^T G, accumulated in float64 batch by batch, so G is never materialised.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterator

import torch

from .config import CalibrationConfig, Method  # noqa: F401 - the config is also imported from here
from .formatting import calibration_ids
from .hf_backend import SiteCache, rows
from .models import ModelInfo
from .subspace import Site, Subspace, new_manifest, site_key
from .tasks import Example, Task

def choose_rank(eigenvalues: torch.Tensor, cfg: CalibrationConfig) -> int:
    """Eigenvalues descending. A fixed rank, the smallest rank holding `energy`, or d/2."""
    width = eigenvalues.numel()
    if cfg.rank is not None:
        return cfg.rank
    if cfg.energy is not None:
        total = eigenvalues.clamp(min=0).sum()
        if total <= 0:
            return 1
        frac = eigenvalues.clamp(min=0).cumsum(0) / total
        return min(width, int((frac < cfg.energy - 1e-12).sum().item()) + 1)
    return max(1, width // 2)


def batches(tok, task: Task, examples: list[Example], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[list[int]]]]:
    """Right-padded (ids, attention mask, span positions per row) batches."""
    encoded = [calibration_ids(tok, task, ex) for ex in examples]
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i, _ in chunk])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in chunk])
        yield ids, mask, [p for _, p in chunk]


def span_nll(logits: torch.Tensor, ids: torch.Tensor, spans: list[list[int]]) -> torch.Tensor:
    """Each row's mean next-token NLL over its span tokens, (B,). Rows stay independent, so the
    gradient of their sum gives every example its own gradient rows."""
    out = []
    for b, pos in enumerate(spans):
        p = torch.tensor(pos, device=logits.device)
        logp = torch.log_softmax(logits[b, p - 1].float(), dim=-1)
        out.append(-logp.gather(1, ids[b, p][:, None]).mean())
    return torch.stack(out)


def site_rows(model, ids: torch.Tensor, mask: torch.Tensor, spans: list[list[int]], sites: list[Site],
              method: Method) -> dict[Site, torch.Tensor]:
    """Rows at each site for one batch: span-loss gradients (or the activations themselves for
    `activation-pca`), (n_valid_tokens, n_kv_heads * head_dim)."""
    layers = {layer for layer, _ in sites}
    seen: dict[Site, torch.Tensor] = {}
    device = next(model.parameters()).device  # the batch goes where the model is (a GPU or the CPU)
    ids, mask = ids.to(device), mask.to(device)

    def site_fn(layer: int, k: torch.Tensor, v: torch.Tensor):
        if layer not in layers:
            return k, v
        if method == "activation-pca":
            seen[(layer, "k")], seen[(layer, "v")] = k.detach(), v.detach()
            return k, v
        # a zero probe added at the site: d loss / d probe is the total derivative w.r.t. K (V),
        # including paths through later target layers, and the backward pass stops here
        pk = torch.zeros_like(k, requires_grad=True)
        pv = torch.zeros_like(v, requires_grad=True)
        seen[(layer, "k")], seen[(layer, "v")] = pk, pv
        return k + pk, v + pv

    cache = SiteCache(model.config, site_fn)
    with torch.set_grad_enabled(method == "gradient"):
        logits = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
        if method == "gradient":
            grads = torch.autograd.grad(span_nll(logits, ids, spans).sum(), [seen[s] for s in sites])
            tensors = dict(zip(sites, grads))
        else:
            tensors = {s: seen[s] for s in sites}
    valid = mask.reshape(-1).bool()
    return {s: rows(t.detach())[valid] for s, t in tensors.items()}


def top_eigen(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, >= 0) and eigenvectors of a symmetric PSD matrix."""
    vals, vecs = torch.linalg.eigh(gram)
    return vals.flip(0).clamp(min=0), vecs.flip(1)


def calibrate(model, tok, info: ModelInfo, task: Task, examples: list[Example], name: str, cfg: CalibrationConfig,
              data: str = "", data_sha256: str = "", progress: Callable[[int], None] | None = None) -> Subspace:
    """Run calibration and return a validated-shape pack (not yet saved)."""
    cfg = CalibrationConfig.model_validate(cfg.model_dump())  # its own rules (an attribute may have been set since)
    layers = cfg.check_model(info)  # and the model's
    sites = [(layer, k) for layer in sorted(set(layers)) for k in cfg.kinds]
    groups = info.n_kv_heads if cfg.granularity == "head" else 1
    width = info.kv_width // groups

    started = time.perf_counter()
    grams = {s: torch.zeros(groups, width, width, dtype=torch.float64) for s in sites}
    sums = {s: torch.zeros(groups, width, dtype=torch.float64) for s in sites}  # activation-pca: for the mean
    n_rows = 0
    if cfg.method != "random":
        for p in model.parameters():
            p.requires_grad_(False)  # gradients w.r.t. K/V only: no weight gradients
        for ids, mask, spans in batches(tok, task, examples, cfg.batch_size):
            for s, r in site_rows(model, ids, mask, spans, sites, cfg.method).items():
                g = r.double().reshape(r.shape[0], groups, width).transpose(0, 1)  # (G, n, w)
                grams[s] += (g.transpose(1, 2) @ g).cpu()  # computed on the model's device, summed on the host
                sums[s] += g.sum(1).cpu()
            n_rows += int(mask.sum())
            if progress:
                progress(len(spans))
    if cfg.method == "activation-pca" and n_rows > 0:
        # PCA is of the centred activations: the scatter matrix sum (x - mu)(x - mu)^T = sum x x^T - n mu mu^T.
        # Without centring the top direction is mostly the mean (post-RoPE keys have a large one), which
        # makes it an uncentred second-moment basis, not PCA. (The projection itself stays P x, through
        # the origin, like every mode's.)
        for s in sites:
            mu = sums[s] / n_rows
            grams[s] -= n_rows * mu[:, :, None] * mu[:, None, :]

    gen = torch.Generator().manual_seed(cfg.seed)
    bases: dict[Site, list[torch.Tensor]] = {}
    spectra: dict[Site, list[torch.Tensor]] = {}
    for s in sites:
        for g in range(groups):
            if cfg.method == "random":
                r = choose_rank(torch.zeros(width), cfg)
                basis = torch.linalg.qr(torch.randn(width, r, generator=gen, dtype=torch.float64)).Q
                spectrum = torch.zeros(width, dtype=torch.float64)
            else:
                vals, vecs = top_eigen(grams[s][g])
                r = choose_rank(vals, cfg)
                basis, spectrum = vecs[:, :r], vals.sqrt()
            bases.setdefault(s, []).append(basis.float())
            spectra.setdefault(s, []).append(spectrum.float())

    manifest = new_manifest(
        name, info, layers=sorted(set(layers)), kinds=list(cfg.kinds), granularity=cfg.granularity,
        method=cfg.method, task_kind=task, rank_rule=cfg.rank_rule(),
        ranks={site_key(*s): [b.shape[1] for b in bases[s]] for s in sites},
        calibration=dict(data=data, data_sha256=data_sha256, n_examples=len(examples), n_rows=n_rows,
                         seconds=round(time.perf_counter() - started, 3)),
    )
    return Subspace(manifest, bases, spectra)


def participation_ratio(spectrum: torch.Tensor) -> float:
    """(sum lambda)^2 / sum lambda^2 of the Gram eigenvalues (= singular values squared)."""
    ev = spectrum.double() ** 2
    denom = (ev**2).sum().item()
    return (ev.sum().item() ** 2) / denom if denom > 0 else math.nan
