"""Pack import refuses archives that would exhaust disk, memory or time - sparse files, compression
bombs, oversized or inconsistent manifests - quickly, in bounded memory, leaving nothing in the store."""
from __future__ import annotations

import gzip
import io
import json
import resource
import shutil
import subprocess
import tarfile
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from server.archive import ArchiveError, Limits, export_pack, import_pack
from spd_engine.models import ModelInfo
from spd_engine.subspace import MAX_MANIFEST_BYTES, PackError, Store, Subspace, load, new_manifest

SERVED = ModelInfo(Path("/models/tiny"), "a" * 64, n_layers=2, n_kv_heads=2, head_dim=16)
GiB = 1024**3


def tiny_pack(name: str = "p", model: ModelInfo = SERVED, rank: int = 4) -> Subspace:
    width = model.n_kv_heads * model.head_dim
    sites = [(layer, kind) for layer in range(model.n_layers) for kind in "kv"]
    basis = torch.linalg.qr(torch.randn(width, rank, generator=torch.Generator().manual_seed(0))).Q
    manifest = new_manifest(name, model, layers=list(range(model.n_layers)), kinds=["k", "v"], granularity="layer",
                            method="random", task_kind="math", rank_rule=f"fixed {rank}",
                            ranks={f"{layer}.{kind}": [rank] for layer, kind in sites},
                            calibration=dict(data="d", data_sha256="0" * 64, n_examples=0, n_rows=0, seconds=0))
    return Subspace(manifest, {s: [basis] for s in sites}, {s: [torch.ones(width)] for s in sites})


def tar_of(members: list[tuple[tarfile.TarInfo | str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            if isinstance(info, str):
                info = tarfile.TarInfo(info)
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def refused(store: Store, data: bytes, error: type[Exception], match: str, limits: Limits | None = None,
            model: ModelInfo = SERVED) -> None:
    """The import raises `error` naming the problem in < 2 s with < 32 MiB of Python allocations, and
    the store is left exactly empty (no pack, no hidden staging directory)."""
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(error, match=match):
            import_pack(store, data, model, limits=limits)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - start < 2
    assert peak < 32 * 1024**2, peak
    assert list(store.root.iterdir()) == []


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "store")
    s.root.mkdir()
    return s


def test_a_valid_pack_round_trips_plain_and_gzipped(store: Store, tmp_path: Path) -> None:
    src = Store(tmp_path / "src")
    src.save(tiny_pack())
    data = export_pack(src, "p")
    assert import_pack(store, data, SERVED) == "p"
    assert import_pack(store, gzip.compress(data), SERVED, "p2") == "p2"  # real bases do not trip the ratio cap
    assert store.names() == ["p", "p2"] and load(store.path("p2"), SERVED).name == "p2"
    assert [p.name for p in store.root.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_a_2_kib_sparse_tar_claiming_8_gib_is_refused_without_extracting(store: Store, tmp_path: Path,
                                                                          fmt: str) -> None:
    if shutil.which("tar") is None:
        pytest.skip("GNU tar is needed to write a sparse archive")
    (tmp_path / "p").mkdir()
    with open(tmp_path / "p" / "bases.safetensors", "wb") as f:
        f.truncate(8 * GiB)  # a hole: no disk used
    subprocess.run(["tar", "--sparse", f"--format={fmt}", "-b", "1", "-cf", "sparse.tar", "p/bases.safetensors"],
                   cwd=tmp_path, check=True)
    data = (tmp_path / "sparse.tar").read_bytes()
    assert len(data) <= 5 * 1024
    assert tarfile.open(fileobj=io.BytesIO(data)).getmembers()[0].size == 8 * GiB
    refused(store, data, ArchiveError, "is a sparse file")
    # even with caps large enough for 8 GiB, a sparse member is refused
    refused(store, data, ArchiveError, "is a sparse file", limits=Limits(max_bases_bytes=16 * GiB))


def _bomb(member_bytes: int) -> bytes:
    """A gzip stream of a tar whose bases member is `member_bytes` zeros: ~1 KiB per MiB."""
    manifest = tiny_pack().manifest.model_dump_json().encode()
    head = tar_of([("p/manifest.json", manifest)])[:-2 * 512 * 10]  # without the end-of-archive blocks
    head = head.rstrip(b"\0")
    head += b"\0" * (-len(head) % 512)
    info = tarfile.TarInfo("p/bases.safetensors")
    info.size = member_bytes
    zeros = gzip.compress(b"\0" * 1024**2, compresslevel=9)
    return gzip.compress(head + info.tobuf()) + zeros * (member_bytes // 1024**2)


def test_a_gzip_bomb_is_refused_by_its_compression_ratio_before_it_is_inflated(store: Store) -> None:
    data = _bomb(1 * GiB)
    assert len(data) < 2 * 1024**2
    # caps generous enough for the claimed size: the ratio stops it after ~1 MiB of output
    refused(store, data, ArchiveError, "compression ratio is over 50:1", limits=Limits(max_bases_bytes=2 * GiB))


def test_a_gzip_bomb_is_refused_by_the_member_cap_of_the_served_model(store: Store) -> None:
    refused(store, _bomb(1 * GiB), ArchiveError, r"claims 1073741824 bytes, over the limit of \d+ for bases")


def test_a_pax_header_bomb_is_refused_before_tarfile_reads_it(store: Store) -> None:
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, 1 * GiB
    zeros = gzip.compress(b"\0" * 1024**2, compresslevel=9)
    refused(store, gzip.compress(info.tobuf()) + zeros * 1024, ArchiveError, "extended header of 1073741824 bytes",
            limits=Limits(max_bases_bytes=2 * GiB, max_ratio=1e9))


def test_the_decompressed_stream_stops_at_the_total_cap() -> None:
    from server.archive import _Bounded

    limits = Limits(max_bases_bytes=1024**2, max_ratio=1e9)
    stream = _Bounded(gzip.compress(b"\0" * (limits.max_total_bytes + 1024**2)), limits)
    with pytest.raises(ArchiveError, match=f"unpacks to more than {limits.max_total_bytes} bytes"):
        while stream.read(1024**2):
            pass


def _rank_60000_width_1_pack(tmp_path: Path) -> tuple[bytes, ModelInfo]:
    model = ModelInfo(Path("/models/one"), "b" * 64, n_layers=1, n_kv_heads=1, head_dim=1)
    manifest = json.loads(tiny_pack(model=model, rank=1).manifest.model_dump_json())
    manifest["ranks"] = {"0.k": [60000], "0.v": [60000]}
    bases = tmp_path / "bases.safetensors"
    basis = torch.zeros(1, 60000)
    basis[0, 0] = 1
    tensors = {}
    for kind in "kv":
        tensors[f"L0.{kind}.g0.basis"], tensors[f"L0.{kind}.g0.spectrum"] = basis.clone(), torch.ones(1)
    save_file(tensors, str(bases))
    members = [("p/manifest.json", json.dumps(manifest).encode()), ("p/bases.safetensors", bases.read_bytes())]
    return tar_of(members), model


def test_a_rank_60000_width_1_manifest_is_refused_before_any_tensor_is_allocated(store: Store, tmp_path: Path) -> None:
    data, model = _rank_60000_width_1_pack(tmp_path)
    assert 400_000 < len(data) < 600_000  # two 240 KB bases (1 x 60000 float32) and the manifest
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # served model of that geometry: the manifest's ranks are what is wrong (loading it would build 60000 x 60000)
    refused(store, data, PackError, r"rank 60000 at 0\.k is outside 0\.\.1", model=model,
            limits=Limits(max_bases_bytes=1024**2))
    # any served model, default caps: still the ranks, found before the 240 KB bases are read
    refused(store, data, PackError, r"rank 60000 at 0\.k is outside 0\.\.1")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200 * 1024  # KiB: no 28 GB identity matrix
    # the same pack on disk is refused by load() itself, with or without a model
    pack = tmp_path / "p"
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(tmp_path, filter="data")
    with pytest.raises(PackError, match="rank 60000"):
        load(pack)


def test_a_manifest_for_another_geometry_is_refused_before_the_bases_are_read(store: Store, tmp_path: Path) -> None:
    src = Store(tmp_path / "src")
    other = ModelInfo(Path("/models/big"), SERVED.identity, n_layers=2, n_kv_heads=4, head_dim=16)
    src.save(tiny_pack(model=other))
    refused(store, export_pack(src, "p"), PackError, r"its model has layers, KV heads, head width \(2, 4, 16\)",
            limits=Limits(max_bases_bytes=1024**2))


@pytest.mark.parametrize("change, message", [
    ({"layers": list(range(60000))}, "layers"),
    ({"rank_rule": "x" * 240_000}, "rank_rule"),
    ({"ranks": {"0.k": [4], "0.v": [4], "1.k": [4]}}, "ranks must list exactly"),
    ({"ranks": {"0.k": [4], "0.v": [4], "1.k": [4], "1.v": [-1]}}, "outside 0..32"),
    ({"layers": [0, 7]}, "layer 7 does not exist"),
    ({"name": "p\n"}, "invalid subspace name"),
])
def test_a_manifest_over_its_bounds_or_inconsistent_is_refused(store: Store, change: dict, message: str) -> None:
    manifest = json.loads(tiny_pack().manifest.model_dump_json()) | change
    data = tar_of([("p/manifest.json", json.dumps(manifest).encode()), ("p/bases.safetensors", b"x")])
    refused(store, data, PackError, message)


def test_a_manifest_member_over_1_mib_is_refused_from_its_header(store: Store) -> None:
    info = tarfile.TarInfo("p/manifest.json")
    info.size = MAX_MANIFEST_BYTES + 1
    refused(store, info.tobuf() + b"\0" * 1024, ArchiveError, "manifest.json' claims 1048577 bytes, over the limit")


def test_an_archive_with_too_many_members_is_refused(store: Store) -> None:
    dirs = []
    for i in range(9):
        d = tarfile.TarInfo("p" if i == 0 else "./p")
        d.type = tarfile.DIRTYPE
        dirs.append((d, b""))
    refused(store, tar_of(dirs), ArchiveError, "more than 8 members")


@pytest.mark.parametrize("members, message", [
    ([("../evil/manifest.json", b"{}")], "not a plain relative path"),
    ([("/abs/manifest.json", b"{}")], "not a plain relative path"),
    ([("p/bases.safetensors", b"x"), ("p/extra.sh", b"x")], "unexpected archive member"),
    ([("p/bases.safetensors", b"x"), ("q/bases.safetensors", b"x")], "exactly one pack directory"),
    ([("p/bases.safetensors", b"x")], "lacks p/manifest.json"),
    ([("p/bases.safetensors", b"x"), ("p/bases.safetensors", b"x")], "appears twice"),
])
def test_unsafe_or_incomplete_archives_are_still_refused(store: Store, members, message: str) -> None:
    refused(store, tar_of(members), ArchiveError, message)


def test_links_are_refused(store: Store) -> None:
    link = tarfile.TarInfo("p/manifest.json")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    refused(store, tar_of([(link, b"")]), ArchiveError, "not a regular file")
