"""Subspace packs as tar archives: export one pack, import one safely.

An imported archive (plain tar, or tar compressed with gzip, bzip2 or xz) must hold exactly one pack
directory `<name>/manifest.json` and `<name>/bases.safetensors` as regular files: no links, devices,
sparse files, absolute paths or `..`. It is read as a stream, member by member, and refused with
an ArchiveError as soon as a header or the bytes read so far show that:
  * it has more than `Limits.max_members` entries;
  * a pax header or GNU long name is over 64 KiB, or a member's header claims more than its cap
    (manifest: 1 MiB; bases: the largest pack the served model can have, every layer x {k, v} at
    full rank);
  * it decompresses to more than that total, or to more than `max_ratio` times its compressed size
    once past 1 MiB (a compression bomb is stopped after at most that much output, never inflated).
The manifest is validated (bounds, ranks <= widths, the served model's identity and geometry:
`spd_engine.subspace.parse_manifest`) as soon as it is read and again before any tensor is loaded.
The pack is unpacked into a hidden, locked directory of the store, validated as a pack for the
served model, fsynced and only then renamed into place (atomic), so a bad archive never leaves
anything visible, and one interrupted by a crash is removed by `Store.clean()`.
"""
from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from spd_engine.subspace import MAX_MANIFEST_BYTES, check_mode_name, PackError, Store, load, parse_manifest, publish, staging

MEMBERS = ("manifest.json", "bases.safetensors")
_CHUNK = 1024**2
_MAX_EXTENDED_HEADER = 64 * 1024  # pax headers and GNU long names, which tarfile reads whole into memory


class ArchiveError(ValueError):
    pass


@dataclass(frozen=True)
class Limits:
    max_members: int = 8  # the pack directory, its two files, and a few spare (e.g. './')
    max_manifest_bytes: int = MAX_MANIFEST_BYTES
    max_bases_bytes: int = 1024**3
    max_ratio: float = 50.0  # float32 bases barely compress (~1.1x); a bomb is 100x-1000x
    ratio_after_bytes: int = _CHUNK

    @property
    def max_total_bytes(self) -> int:
        """The whole decompressed tar stream: both members plus headers and padding."""
        return self.max_manifest_bytes + self.max_bases_bytes + 4 * _MAX_EXTENDED_HEADER + 64 * 1024

    @classmethod
    def for_model(cls, model_info) -> "Limits":
        """Caps for a pack of `model_info`: its bases file at most every layer x {k, v} x full rank."""
        width = model_info.n_kv_heads * model_info.head_dim
        tensors = model_info.n_layers * 2 * model_info.n_kv_heads * 2
        return cls(max_bases_bytes=model_info.n_layers * 2 * (width * width + width) * 4 + tensors * 256 + 64 * 1024)


def export_pack(store: Store, name: str) -> bytes:
    path = store.path(name)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for m in MEMBERS:
            tar.add(path / m, arcname=f"{name}/{m}", recursive=False)
    return buf.getvalue()


class _Bounded(io.RawIOBase):
    """The decompressed archive as a stream that raises ArchiveError past the total size or the ratio."""

    def __init__(self, data: bytes, limits: Limits):
        self.raw = io.BytesIO(data)
        self.limits = limits
        head = data[:6]
        if head.startswith(b"\x1f\x8b"):
            self.inner, self.kind = gzip.GzipFile(fileobj=self.raw, mode="rb"), "gzip"
        elif head.startswith(b"BZh"):
            self.inner, self.kind = bz2.BZ2File(self.raw, mode="rb"), "bzip2"
        elif head.startswith(b"\xfd7zXZ\x00"):
            self.inner, self.kind = lzma.LZMAFile(self.raw, mode="rb"), "xz"
        else:
            self.inner, self.kind = self.raw, None
        self.out = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        want = min(len(b), _CHUNK)
        try:
            chunk = self.inner.read(want)
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
            raise ArchiveError(f"the {self.kind} data is corrupt: {e}") from None
        n = len(chunk)
        b[:n] = chunk
        self.out += n
        if self.out > self.limits.max_total_bytes:
            raise ArchiveError(f"the archive unpacks to more than {self.limits.max_total_bytes} bytes "
                               "(the largest pack for the served model)")
        if self.kind and self.out > self.limits.ratio_after_bytes:
            ratio = self.out / max(1, self.raw.tell())
            if ratio > self.limits.max_ratio:
                raise ArchiveError(f"the archive's compression ratio is over {self.limits.max_ratio:g}:1 "
                                   f"({self.out} bytes from {self.raw.tell()}): refused as a compression bomb")
        return n


class _TarInfo(tarfile.TarInfo):
    """Refuses an oversized pax header or GNU long name before tarfile reads it into memory."""

    def _proc_member(self, tarfile_):
        extended = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                    tarfile.GNUTYPE_LONGLINK)
        if self.type in extended and self.size > _MAX_EXTENDED_HEADER:
            raise ArchiveError(f"archive has an extended header of {self.size} bytes, over the limit of "
                               f"{_MAX_EXTENDED_HEADER}")
        return super()._proc_member(tarfile_)


def _check_member(info: tarfile.TarInfo) -> list[str]:
    """The path parts of a member, or ArchiveError for anything but a plain dir or regular file."""
    p = PurePosixPath(info.name)
    if p.is_absolute() or ".." in p.parts or info.name.startswith("/") or "\\" in info.name:
        raise ArchiveError(f"archive member {info.name!r} is not a plain relative path")
    if info.issparse() or info.type == tarfile.GNUTYPE_SPARSE:
        raise ArchiveError(f"archive member {info.name!r} is a sparse file (refused)")
    if not (info.isdir() or info.type in (tarfile.REGTYPE, tarfile.AREGTYPE)):
        raise ArchiveError(f"archive member {info.name!r} is not a regular file (links and devices are refused)")
    return [x for x in p.parts if x != "."]


def import_pack(store: Store, data: bytes, model_info, rename: str | None = None, limits: Limits | None = None) -> str:
    """Validate and install a pack archive; return its name. Raises ArchiveError/PackError,
    FileExistsError when the name is taken, ValueError for a bad name. `limits` defaults to
    `Limits.for_model(model_info)`."""
    limits = limits or Limits.for_model(model_info)
    stream = _Bounded(data, limits)
    try:
        tar = tarfile.open(fileobj=io.BufferedReader(stream, _CHUNK), mode="r|", tarinfo=_TarInfo)
    except (tarfile.TarError, EOFError) as e:
        raise ArchiveError(f"not a tar archive: {e}") from None
    with tar:
        try:
            return _install(store, tar, model_info, rename, limits)
        except (tarfile.TarError, EOFError) as e:
            raise ArchiveError(f"not a valid tar archive: {e}") from None


def _install(store: Store, tar: tarfile.TarFile, model_info, rename: str | None, limits: Limits) -> str:
    caps = {MEMBERS[0]: limits.max_manifest_bytes, MEMBERS[1]: limits.max_bases_bytes}
    with staging(store.root, ".import-pack.") as tmp:
        incoming = tmp / ".members"  # a pack name cannot start with '.', so never collides below
        incoming.mkdir()
        dirs: set[str] = set()
        files: dict[str, Path] = {}
        for count, info in enumerate(tar, 1):  # stream: each member's data is read before the next header
            if count > limits.max_members:
                raise ArchiveError(f"archive has more than {limits.max_members} members")
            parts = _check_member(info)
            if info.isdir() and len(parts) == 1:
                dirs.add(parts[0])
                continue
            if info.isdir() or len(parts) != 2 or parts[1] not in MEMBERS:
                raise ArchiveError(f"unexpected archive member {info.name!r}: a pack archive holds only "
                                   f"<name>/{MEMBERS[0]} and <name>/{MEMBERS[1]}")
            member = parts[1]
            dirs.add(parts[0])
            if len(dirs) != 1:
                raise ArchiveError(f"a pack archive holds exactly one pack directory, found {len(dirs)}")
            if member in files:
                raise ArchiveError(f"archive member {info.name!r} appears twice")
            if info.size > caps[member]:
                raise ArchiveError(f"archive member {info.name!r} claims {info.size} bytes, over the limit of "
                                   f"{caps[member]} for {member} (the largest for the served model)")
            files[member] = _copy(tar, info, incoming / member)
            if member == MEMBERS[0]:  # refuse a bad manifest before reading the bases
                parse_manifest(files[member].read_bytes(), model_info, where=info.name)
        if len(dirs) != 1:
            raise ArchiveError(f"a pack archive holds exactly one pack directory, found {len(dirs)}")
        name = dirs.pop()
        missing = [m for m in MEMBERS if m not in files]
        if missing:
            raise ArchiveError(f"archive lacks {name}/{missing[0]}")
        name = check_mode_name(rename or name)
        if (store.root / name).exists():
            raise FileExistsError(f"a subspace named {name!r} already exists")
        pack_dir = tmp / name
        pack_dir.mkdir()
        for member, path in files.items():
            path.rename(pack_dir / member)
        if rename:
            manifest = json.loads((pack_dir / "manifest.json").read_text())
            manifest["name"] = name
            (pack_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
        pack = load(pack_dir, model_info)  # PackError when invalid or for another model
        target = store.path(name)
        if target.exists():
            raise FileExistsError(f"a subspace named {name!r} already exists")
        publish(pack_dir, target)
        return pack.name


def _copy(tar: tarfile.TarFile, info: tarfile.TarInfo, dest: Path) -> Path:
    src = tar.extractfile(info)
    if src is None:
        raise ArchiveError(f"archive member {info.name!r} has no data")
    written = 0
    with open(dest, "wb") as f:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            if written > info.size:  # cannot happen with tarfile; belt and braces
                raise ArchiveError(f"archive member {info.name!r} is longer than its header says")
            f.write(chunk)
    return dest


__all__ = ["ArchiveError", "Limits", "PackError", "export_pack", "import_pack"]
