"""Subspace packs: one capability mode on disk, and the store that holds them.

A pack is a directory:
    manifest.json       - `Manifest` below (what, for which model, where, how it was made)
    bases.safetensors   - per site and group: `L{layer}.{kind}.g{group}.basis` (w x r, orthonormal)
                          and `L{layer}.{kind}.g{group}.spectrum` (w, singular values, descending)

Packs are validated when loaded; a pack that fails is never served. The manifest is checked first
(`parse_manifest`: size, bounds, ranks consistent with the layers, kinds and widths, and the model
when given), so a manifest that would make loading allocate more than the pack's own size is refused
before any tensor is read.

Writes are atomic and durable: a pack is staged in a hidden directory of the store, its files and
directory fsynced, then renamed into place and the store directory fsynced. A staging directory is
locked (flock) while its writer runs; `Store.clean()` (also run when a Store is created) removes
the hidden staging and trash directories that crashed writers left, never one still locked.

A pack's identity is its digest (`pack_digest`): a request is admitted with the digests of its
modes and projected with exactly those bases. `Store.retain` keeps an admitted pack's files under
`<store>/.by-digest/<digest>/`, so a request admitted before its mode was deleted or replaced still
finds them; `Store.prune_retained` drops those of packs no longer in the store.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import __version__
from .atomic import fsync_dir, fsync_file
from .models import ModelInfo
from .paths import check_name, child

FORMAT_VERSION = 1
# The one site every backend captures and projects at (see the spec): K/V entering the KV cache,
# after the K/V maps, any k-norm and rotary embedding.
SITE = "kv-cache-write"
ORTHO_TOL = 1e-3
MAX_MANIFEST_BYTES = 1024**2  # a real manifest is a few KiB (ranks for every layer of a large model included)
_MAX_LAYERS, _MAX_KV_HEADS, _MAX_HEAD_DIM, _MAX_WIDTH = 1024, 1024, 4096, 65536

log = logging.getLogger(__name__)

Site = tuple[int, str]  # (layer, kind)
AUTO_MODE = "auto"  # `capability: "auto"` (spd_engine.auto): the server chooses; never a mode's own name


def check_mode_name(name: str) -> str:
    check_name(name, "subspace name")
    if name == AUTO_MODE:
        raise ValueError(f"invalid subspace name {name!r}: reserved for capability auto (the server chooses the mode)")
    return name


class PackError(ValueError):
    """A pack that is malformed, corrupted, or does not match the model it is used with."""


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    identity: str = Field(max_length=128)
    source: str = Field(max_length=4096)
    n_layers: int = Field(gt=0, le=_MAX_LAYERS)
    n_kv_heads: int = Field(gt=0, le=_MAX_KV_HEADS)
    head_dim: int = Field(gt=0, le=_MAX_HEAD_DIM)

    @model_validator(mode="after")
    def _width(self) -> "ModelRef":
        if self.n_kv_heads * self.head_dim > _MAX_WIDTH:
            raise ValueError(f"n_kv_heads x head_dim = {self.n_kv_heads * self.head_dim} is over {_MAX_WIDTH}")
        return self


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: str = Field(max_length=4096)
    data_sha256: str = Field(max_length=128)
    n_examples: int = Field(ge=0)
    n_rows: int = Field(ge=0)
    seconds: float = Field(ge=0)


class Manifest(BaseModel):
    """Bounded and self-consistent on construction: every layer exists in `model`, `ranks` has
    exactly one entry per (layer, kind) with one rank per group, and 0 <= rank <= the group's width."""

    model_config = ConfigDict(extra="forbid")
    format_version: Literal[1] = FORMAT_VERSION
    name: str = Field(max_length=64)
    model: ModelRef
    site: Literal["kv-cache-write"] = SITE
    layers: list[int] = Field(max_length=_MAX_LAYERS)
    kinds: list[Literal["k", "v"]] = Field(max_length=2)
    granularity: Literal["layer", "head"]
    method: Literal["gradient", "random", "activation-pca"]
    task_kind: str = Field(max_length=64)
    rank_rule: str = Field(max_length=1024)
    ranks: dict[str, list[int]] = Field(max_length=2 * _MAX_LAYERS)  # "15.k" -> rank per group
    calibration: Calibration
    created: str = Field(max_length=64)
    tool_version: str = Field(max_length=64)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_mode_name(v)

    @property
    def groups(self) -> int:
        return self.model.n_kv_heads if self.granularity == "head" else 1

    @property
    def width(self) -> int:
        """Rows of each basis: one head's width (head granularity) or all KV heads' (layer)."""
        return self.model.head_dim * (1 if self.granularity == "head" else self.model.n_kv_heads)

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        if len(set(self.layers)) != len(self.layers) or len(set(self.kinds)) != len(self.kinds):
            raise ValueError("layers and kinds must not repeat")
        bad = [layer for layer in self.layers if not 0 <= layer < self.model.n_layers]
        if bad:
            raise ValueError(f"layer {bad[0]} does not exist (the model has {self.model.n_layers})")
        want = {site_key(layer, kind) for layer in self.layers for kind in self.kinds}
        if set(self.ranks) != want:
            extra, missing = sorted(set(self.ranks) - want), sorted(want - set(self.ranks))
            raise ValueError(f"ranks must list exactly the sites of layers x kinds "
                             f"({'missing ' + missing[0] if missing else 'unexpected ' + extra[0]})")
        for key, ranks in self.ranks.items():
            if len(ranks) != self.groups:
                raise ValueError(f"ranks for {key} must list {self.groups} group(s), not {len(ranks)}")
            for r in ranks:
                if not 0 <= r <= self.width:
                    raise ValueError(f"rank {r} at {key} is outside 0..{self.width} (the basis width)")
        return self


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
        return self.manifest.groups

    def check_model(self, model: ModelInfo) -> None:
        check_manifest_model(self.manifest, model)

    def save(self, root: Path, *, overwrite: bool = False) -> Path:
        """Write atomically into root/<name>: readers see the old pack or the new one, never half."""
        from safetensors.torch import save_file

        target = child(root, self.name, "subspace name")
        if target.exists() and not overwrite:
            raise PackError(f"a subspace named {self.name!r} already exists in {root}")
        with staging(root, f".{self.name}.") as tmp:
            tensors = {}
            for (layer, kind), groups in self.bases.items():
                for g, b in enumerate(groups):
                    tensors[f"L{layer}.{kind}.g{g}.basis"] = b.to(torch.float32).contiguous()
                    tensors[f"L{layer}.{kind}.g{g}.spectrum"] = self.spectra[(layer, kind)][g].to(torch.float32).contiguous()
            save_file(tensors, str(tmp / "bases.safetensors"))
            (tmp / "manifest.json").write_text(self.manifest.model_dump_json(indent=2))
            publish(tmp, target, overwrite=overwrite)
        return target


def publish(staged: Path, target: Path, *, overwrite: bool = False) -> None:
    """Make the staged pack directory `target`, durably: fsync its files and itself, rename it into
    place, fsync the store directory. With `overwrite` an existing pack is moved aside first, then
    removed; without, FileExistsError if `target` exists (also when it appeared meanwhile)."""
    for f in staged.iterdir():
        fsync_file(f)
    staged.chmod(0o755)
    fsync_dir(staged)
    if overwrite and target.exists():
        old = target.with_name(f".{target.name}.old-{time.time_ns()}")
        target.rename(old)
        staged.rename(target)
        fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    if target.exists():
        raise FileExistsError(f"a subspace named {target.name!r} already exists")
    try:
        staged.rename(target)  # fails when a non-empty pack directory appeared meanwhile
    except OSError as e:
        raise FileExistsError(f"a subspace named {target.name!r} already exists ({e.strerror})") from None
    fsync_dir(target.parent)


# Hidden directories of a store that writers create and remove: save staging (`.<name>.<8 chars>`),
# import staging (`.import-pack.<8 chars>`; before, `.import-<name>.<8 chars>`), a replaced pack
# (`.<name>.old-<ns>`), a deleted one (`.<name>.deleted-<ns>`). Anything else hidden is left alone.
_LEFTOVER = re.compile(r"\.(?:import-)?[A-Za-z0-9][A-Za-z0-9._-]*\.(?:[a-z0-9_]{8}|old-[0-9]+|deleted-[0-9]+)")


@contextlib.contextmanager
def staging(root: Path, prefix: str) -> Iterator[Path]:
    """A fresh hidden directory in `root`, flock-ed for as long as the block runs (so `Store.clean`
    in any process leaves it alone) and removed afterwards unless the block renamed it away."""
    root.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # a cleaner may have taken it between mkdtemp and flock: then it is gone, start again
            if os.stat(tmp).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield tmp
    finally:
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # no-op when it was renamed into place
        finally:
            os.close(fd)  # releases the lock


def new_manifest(name: str, model: ModelInfo, **fields) -> Manifest:
    check_mode_name(name)
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
        with open(path / "manifest.json", "rb") as f:
            text = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise PackError(f"{path}: no manifest.json (not a subspace pack)") from None
    manifest = parse_manifest(text, model, where=f"{path}/manifest.json")
    if manifest.name != path.name:
        raise PackError(f"{path}: manifest names the pack {manifest.name!r} but its directory is {path.name!r}")
    try:
        tensors = load_file(str(path / "bases.safetensors"))
    except FileNotFoundError:
        raise PackError(f"{path}: no bases.safetensors") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PackError(f"{path}/bases.safetensors is unreadable (truncated or corrupted?): {e}") from None

    width = manifest.width
    bases: dict[Site, list[torch.Tensor]] = {}
    spectra: dict[Site, list[torch.Tensor]] = {}
    for layer in manifest.layers:
        for kind in manifest.kinds:
            for g, rank in enumerate(manifest.ranks[site_key(layer, kind)]):
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
    return Subspace(manifest, bases, spectra)


def parse_manifest(text: str | bytes, model: ModelInfo | None = None, where: str = "manifest.json") -> Manifest:
    """Validate a manifest before anything of its pack is read: at most MAX_MANIFEST_BYTES, the
    bounds and consistency of `Manifest`, and with `model` that it is that model's. PackError if not."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise PackError(f"{where} is over the limit of {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = Manifest.model_validate_json(text)
    except ValidationError as e:
        raise PackError(f"{where} is invalid: {_first_error(e)}") from None
    if model is not None:
        check_manifest_model(manifest, model)
    return manifest


def check_manifest_model(manifest: Manifest, model: ModelInfo) -> None:
    """PackError unless the manifest was made for `model` (identity, and the geometry it implies)."""
    ref = manifest.model
    if ref.identity != model.identity:
        raise PackError(
            f"pack {manifest.name!r} was made for model {ref.source} ({ref.identity[:12]}), "
            f"not for {model.path} ({model.identity[:12]})"
        )
    geometry = (ref.n_layers, ref.n_kv_heads, ref.head_dim)
    if geometry != (model.n_layers, model.n_kv_heads, model.head_dim):
        raise PackError(f"pack {manifest.name!r}: its model has layers, KV heads, head width {geometry}, the "
                        f"served model {(model.n_layers, model.n_kv_heads, model.head_dim)}")


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    return f"field {'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"


PACK_FILES = ("manifest.json", "bases.safetensors")
RETAINED = ".by-digest"  # <store>/.by-digest/<digest>/: the admitted bases, kept when the pack is deleted


def pack_digest(path: Path) -> str:
    """The content identity of a pack directory (manifest and bases)."""
    h = hashlib.sha256()
    for member in PACK_FILES:
        with open(path / member, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:32]


class Store:
    """The subspace store: a directory of packs, addressed by validated names only."""

    def __init__(self, root: Path, *, clean: bool = True):
        self.root = Path(root)
        if clean:
            self.clean()

    def clean(self) -> list[str]:
        """Remove the staging and trash directories that crashed writers left in the store (see
        `_LEFTOVER`); one still locked by a running writer is kept. Returns the names removed.
        Never raises: a store that cannot be listed or changed is left as it is."""
        removed = []
        try:
            entries = [p for p in self.root.iterdir() if _LEFTOVER.fullmatch(p.name)]
        except OSError:
            return removed
        for p in entries:
            try:
                fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except OSError:
                continue  # gone, or not a directory
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue  # a writer is using it
            try:
                shutil.rmtree(p)
                removed.append(p.name)
            except OSError as e:
                log.warning("subspace store %s: cannot remove leftover %s: %s", self.root, p.name, e)
            finally:
                os.close(fd)
        if removed:
            with contextlib.suppress(OSError):
                fsync_dir(self.root)
            log.info("subspace store %s: removed %d leftover director%s of interrupted writes: %s",
                     self.root, len(removed), "y" if len(removed) == 1 else "ies", ", ".join(removed))
        return removed

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
        fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def digest(self, name: str) -> str:
        return pack_digest(self.path(name))

    def retained(self, digest: str) -> Path:
        """Where `retain` keeps the pack with this digest."""
        return child(self.root / RETAINED, digest, "pack digest")

    def retain(self, name: str, digest: str) -> Path:
        """A copy of pack `name` (whose digest is `digest`) addressed by its digest: hard links,
        since packs are only ever replaced by rename, never written in place."""
        target = self.retained(digest)
        if not (target / PACK_FILES[1]).is_file():
            tmp = target.with_name(f".{digest}.{os.getpid()}.{threading.get_ident()}")
            tmp.mkdir(parents=True, exist_ok=True)
            for member in PACK_FILES:
                dst = tmp / member
                if not dst.exists():
                    try:
                        os.link(self.path(name) / member, dst)
                    except OSError:
                        shutil.copyfile(self.path(name) / member, dst)
            try:
                tmp.rename(target)
            except OSError:  # another process retained it first
                shutil.rmtree(tmp, ignore_errors=True)
        return target

    def prune_retained(self) -> None:
        """Drop the retained copies of packs no longer in the store (at start, when no request
        admitted earlier is left)."""
        root = self.root / RETAINED
        if not root.is_dir():
            return
        keep = set()
        for name in self.names():
            with contextlib.suppress(OSError):
                keep.add(self.digest(name))
        for d in root.iterdir():
            if d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)


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
