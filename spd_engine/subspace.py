"""Subspace packs: one capability mode on disk, and the store that holds them.

A pack is a directory:
    manifest.json       - `Manifest` below (what, for which model, where, how it was made)
    bases.safetensors   - per site and group: `L{layer}.{kind}.g{group}.basis` (w x r, orthonormal)
                          and `L{layer}.{kind}.g{group}.spectrum` (w, singular values, descending)

Packs are validated when loaded; a pack that fails is never served. Writes are atomic.
"""
from __future__ import annotations

import math
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import __version__
from .models import ModelInfo
from .paths import check_name, child

FORMAT_VERSION = 1
# The one site every backend captures and projects at (see the spec): K/V entering the KV cache,
# after the K/V maps, any k-norm and rotary embedding.
SITE = "kv-cache-write"
ORTHO_TOL = 1e-3

Site = tuple[int, str]  # (layer, kind)


class PackError(ValueError):
    """A pack that is malformed, corrupted, or does not match the model it is used with."""


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    identity: str
    source: str
    n_layers: int = Field(gt=0)
    n_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: str
    data_sha256: str
    n_examples: int = Field(ge=0)
    n_rows: int = Field(ge=0)
    seconds: float = Field(ge=0)


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format_version: Literal[1] = FORMAT_VERSION
    name: str
    model: ModelRef
    site: Literal["kv-cache-write"] = SITE
    layers: list[int]
    kinds: list[Literal["k", "v"]]
    granularity: Literal["layer", "head"]
    method: Literal["gradient", "random", "activation-pca"]
    task_kind: str
    rank_rule: str
    ranks: dict[str, list[int]]  # "15.k" -> rank per group
    calibration: Calibration
    created: str
    tool_version: str


def site_key(layer: int, kind: str) -> str:
    return f"{layer}.{kind}"


class Subspace:
    """A loaded pack: its manifest and, per site, one orthonormal basis per group."""

    def __init__(self, manifest: Manifest, bases: dict[Site, list[torch.Tensor]], spectra: dict[Site, list[torch.Tensor]]):
        self.manifest, self.bases, self.spectra = manifest, bases, spectra

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def groups(self) -> int:
        return self.manifest.model.n_kv_heads if self.manifest.granularity == "head" else 1

    def check_model(self, model: ModelInfo) -> None:
        ref = self.manifest.model
        if ref.identity != model.identity:
            raise PackError(
                f"pack {self.name!r} was made for model {ref.source} ({ref.identity[:12]}), "
                f"not for {model.path} ({model.identity[:12]})"
            )
        for layer in self.manifest.layers:
            if not 0 <= layer < model.n_layers:
                raise PackError(f"pack {self.name!r}: layer {layer} does not exist (model has {model.n_layers})")

    def save(self, root: Path, *, overwrite: bool = False) -> Path:
        """Write atomically into root/<name>: readers see the old pack or the new one, never half."""
        from safetensors.torch import save_file

        target = child(root, self.name, "subspace name")
        if target.exists() and not overwrite:
            raise PackError(f"a subspace named {self.name!r} already exists in {root}")
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.name}.", dir=root))
        try:
            tensors = {}
            for (layer, kind), groups in self.bases.items():
                for g, b in enumerate(groups):
                    tensors[f"L{layer}.{kind}.g{g}.basis"] = b.to(torch.float32).contiguous()
                    tensors[f"L{layer}.{kind}.g{g}.spectrum"] = self.spectra[(layer, kind)][g].to(torch.float32).contiguous()
            save_file(tensors, str(tmp / "bases.safetensors"))
            (tmp / "manifest.json").write_text(self.manifest.model_dump_json(indent=2))
            tmp.chmod(0o755)
            if target.exists():
                old = target.with_name(f".{self.name}.old-{time.time_ns()}")
                target.rename(old)
                tmp.rename(target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target


def new_manifest(name: str, model: ModelInfo, **fields) -> Manifest:
    check_name(name, "subspace name")
    ref = ModelRef(identity=model.identity, source=str(model.path), n_layers=model.n_layers,
                   n_kv_heads=model.n_kv_heads, head_dim=model.head_dim)
    return Manifest(name=name, model=ref, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    tool_version=__version__, **fields)


def load(path: Path, model: ModelInfo | None = None) -> Subspace:
    """Read and validate a pack directory; with `model`, also check it belongs to that model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        manifest = Manifest.model_validate_json((path / "manifest.json").read_text())
    except FileNotFoundError:
        raise PackError(f"{path}: no manifest.json (not a subspace pack)") from None
    except ValidationError as e:
        raise PackError(f"{path}/manifest.json is invalid: {_first_error(e)}") from None
    if manifest.name != path.name:
        raise PackError(f"{path}: manifest names the pack {manifest.name!r} but its directory is {path.name!r}")
    try:
        tensors = load_file(str(path / "bases.safetensors"))
    except FileNotFoundError:
        raise PackError(f"{path}: no bases.safetensors") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PackError(f"{path}/bases.safetensors is unreadable (truncated or corrupted?): {e}") from None

    ref = manifest.model
    groups = ref.n_kv_heads if manifest.granularity == "head" else 1
    width = ref.head_dim if manifest.granularity == "head" else ref.n_kv_heads * ref.head_dim
    bases: dict[Site, list[torch.Tensor]] = {}
    spectra: dict[Site, list[torch.Tensor]] = {}
    for layer in manifest.layers:
        for kind in manifest.kinds:
            ranks = manifest.ranks.get(site_key(layer, kind))
            if ranks is None or len(ranks) != groups:
                raise PackError(f"{path}: manifest ranks for {site_key(layer, kind)} must list {groups} group(s)")
            for g, rank in enumerate(ranks):
                key = f"L{layer}.{kind}.g{g}"
                b, s = tensors.get(f"{key}.basis"), tensors.get(f"{key}.spectrum")
                if b is None or s is None:
                    raise PackError(f"{path}: bases.safetensors lacks {key}.basis or {key}.spectrum")
                if tuple(b.shape) != (width, rank) or tuple(s.shape) != (width,):
                    raise PackError(f"{path}: {key} has shape {tuple(b.shape)}, expected ({width}, {rank})")
                if not (torch.isfinite(b).all() and torch.isfinite(s).all()):
                    raise PackError(f"{path}: {key} has non-finite values")
                err = (b.double().T @ b.double() - torch.eye(rank, dtype=torch.float64)).abs().max().item()
                if rank and err > ORTHO_TOL:
                    raise PackError(f"{path}: {key}.basis is not orthonormal (max |U^T U - I| = {err:.2e})")
                bases.setdefault((layer, kind), []).append(b)
                spectra.setdefault((layer, kind), []).append(s)
    pack = Subspace(manifest, bases, spectra)
    if model is not None:
        pack.check_model(model)
    return pack


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    return f"field {'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"


class Store:
    """The subspace store: a directory of packs, addressed by validated names only."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "manifest.json").is_file() and not p.name.startswith("."))

    def path(self, name: str) -> Path:
        return child(self.root, name, "subspace name")

    def load(self, name: str, model: ModelInfo | None = None) -> Subspace:
        path = self.path(name)
        if not path.is_dir():
            raise KeyError(f"no subspace named {name!r}; known: {', '.join(self.names()) or '(none)'}")
        return load(path, model)

    def save(self, pack: Subspace, *, overwrite: bool = False) -> Path:
        return pack.save(self.root, overwrite=overwrite)

    def delete(self, name: str) -> None:
        path = self.path(name)
        if not path.is_dir():
            raise KeyError(f"no subspace named {name!r}")
        trash = path.with_name(f".{name}.deleted-{time.time_ns()}")
        path.rename(trash)  # atomic disappearance, then clean up
        shutil.rmtree(trash, ignore_errors=True)


def principal_angles(a: Subspace, b: Subspace) -> dict[str, list[float]]:
    """Principal angles in degrees between two packs at every site and group they share."""
    out: dict[str, list[float]] = {}
    for site, ga in a.bases.items():
        gb = b.bases.get(site)
        if gb is None or len(gb) != len(ga):
            continue
        for g, (ua, ub) in enumerate(zip(ga, gb)):
            if ua.shape[0] != ub.shape[0] or not ua.shape[1] or not ub.shape[1]:
                continue
            cos = torch.linalg.svdvals(ua.double().T @ ub.double()).clamp(-1, 1)
            out[f"{site_key(*site)}.g{g}"] = [math.degrees(math.acos(c)) for c in cos.tolist()]
    return out


def site_basis(pack: Subspace, site: Site, heads: list[int] | None = None) -> torch.Tensor:
    """The pack's basis at `site` over the KV heads this process holds (None: all heads).

    Head-granularity bases become one block-diagonal basis, so every pack projects rows of the
    same width. A layer-granularity basis mixes heads, so it cannot be split across ranks.
    """
    groups = pack.bases[site]
    if pack.manifest.granularity == "layer":
        if heads is not None and list(heads) != list(range(pack.manifest.model.n_kv_heads)):
            raise PackError(
                f"pack {pack.name!r} has layer granularity: it mixes all KV heads, so it cannot be applied "
                f"when this process holds only heads {list(heads)} (tensor parallelism); calibrate it with "
                "granularity 'head'"
            )
        return groups[0]
    chosen = range(len(groups)) if heads is None else heads
    return torch.block_diag(*[groups[h] for h in chosen])
