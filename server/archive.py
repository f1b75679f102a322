"""Subspace packs as tar archives: export one pack, import one safely.

An imported archive must hold exactly one pack directory `<name>/manifest.json` and
`<name>/bases.safetensors` as regular files: no links, devices, absolute paths or `..`. It is
unpacked into a hidden directory of the store, validated as a pack for the served model, and only
then renamed into place (atomic), so a bad archive never leaves anything visible.
"""
from __future__ import annotations

import io
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from spd_engine.paths import check_name
from spd_engine.subspace import PackError, Store, load

MEMBERS = ("manifest.json", "bases.safetensors")


class ArchiveError(ValueError):
    pass


def export_pack(store: Store, name: str) -> bytes:
    path = store.path(name)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for m in MEMBERS:
            tar.add(path / m, arcname=f"{name}/{m}", recursive=False)
    return buf.getvalue()


def _members(tar: tarfile.TarFile) -> tuple[str, dict[str, tarfile.TarInfo]]:
    dirs, files = set(), {}
    for info in tar.getmembers():
        p = PurePosixPath(info.name)
        if p.is_absolute() or ".." in p.parts or info.name.startswith("/") or "\\" in info.name:
            raise ArchiveError(f"archive member {info.name!r} is not a plain relative path")
        parts = [x for x in p.parts if x != "."]
        if info.isdir() and len(parts) == 1:
            dirs.add(parts[0])
            continue
        if not info.isreg():
            raise ArchiveError(f"archive member {info.name!r} is not a regular file (links and devices are refused)")
        if len(parts) != 2 or parts[1] not in MEMBERS:
            raise ArchiveError(f"unexpected archive member {info.name!r}: a pack archive holds only "
                               f"<name>/{MEMBERS[0]} and <name>/{MEMBERS[1]}")
        if parts[1] in files:
            raise ArchiveError(f"archive member {info.name!r} appears twice")
        dirs.add(parts[0])
        files[parts[1]] = info
    if len(dirs) != 1:
        raise ArchiveError(f"a pack archive holds exactly one pack directory, found {len(dirs)}")
    name = dirs.pop()
    missing = [m for m in MEMBERS if m not in files]
    if missing:
        raise ArchiveError(f"archive lacks {name}/{missing[0]}")
    return name, files


def import_pack(store: Store, data: bytes, model_info, rename: str | None = None) -> str:
    """Validate and install a pack archive; return its name. Raises ArchiveError/PackError,
    FileExistsError when the name is taken, ValueError for a bad name."""
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ArchiveError(f"not a tar archive: {e}") from None
    with tar:
        name, files = _members(tar)
        name = check_name(rename or name, "subspace name")
        if (store.root / name).exists():
            raise FileExistsError(f"a subspace named {name!r} already exists")
        store.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".import-{name}.", dir=store.root))
        try:
            pack_dir = tmp / name
            pack_dir.mkdir()
            for m, info in files.items():
                src = tar.extractfile(info)
                with open(pack_dir / m, "wb") as f:
                    shutil.copyfileobj(src, f)
            if rename:
                import json

                manifest = json.loads((pack_dir / "manifest.json").read_text())
                manifest["name"] = name
                (pack_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
            pack = load(pack_dir, model_info)  # PackError when invalid or for another model
            target = store.path(name)
            if target.exists():
                raise FileExistsError(f"a subspace named {name!r} already exists")
            pack_dir.chmod(0o755)
            pack_dir.rename(target)
            return pack.name
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["ArchiveError", "PackError", "export_pack", "import_pack"]
