"""Failure handling: packs that are corrupted or belong elsewhere are refused, the store is unchanged."""
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from spd_engine import models
from spd_engine.calibrate import CalibrationConfig, calibrate
from spd_engine.atomic import write_json
from spd_engine.subspace import PackError, Store, load, staging
from spd_engine.tasks import Example

EX = [Example(id="a", prompt="What is 2 plus 2?", answer="The answer is 4."),
      Example(id="b", prompt="What is 10 plus 5?", answer="The answer is 15.")]


@pytest.fixture(scope="module")
def pack(tiny_path, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    return calibrate(model, tokenizer, models.info(tiny_path), "math", EX, "good", CalibrationConfig(layers=[0, 1]))


def _snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_pack_round_trips_through_the_store(pack, tmp_path, tiny_path):
    store = Store(tmp_path)
    store.save(pack)
    again = store.load("good", models.info(tiny_path))
    assert again.manifest == pack.manifest
    for site, groups in pack.bases.items():
        assert torch.allclose(groups[0], again.bases[site][0])
    assert store.names() == ["good"]


def _corrupt(path, how):
    if how == "truncated":
        data = (path / "bases.safetensors").read_bytes()
        (path / "bases.safetensors").write_bytes(data[: len(data) // 2])
    elif how in ("nan", "shape", "not-orthonormal", "missing-tensor"):
        t = load_file(str(path / "bases.safetensors"))
        key = "L1.k.g0.basis"
        if how == "nan":
            t[key][0, 0] = float("nan")
        elif how == "shape":
            t[key] = t[key][:-1]
        elif how == "not-orthonormal":
            t[key] = t[key] * 2
        else:
            del t[key]
        save_file(t, str(path / "bases.safetensors"))
    elif how == "bad-manifest":
        m = json.loads((path / "manifest.json").read_text())
        m["granularity"] = "banana"
        (path / "manifest.json").write_text(json.dumps(m))
    elif how == "no-manifest":
        (path / "manifest.json").unlink()


@pytest.mark.parametrize("how,message", [
    ("truncated", "unreadable"), ("nan", "non-finite"), ("shape", "shape"),
    ("not-orthonormal", "not orthonormal"), ("missing-tensor", "lacks"),
    ("bad-manifest", "granularity"), ("no-manifest", "no manifest.json"),
])
def test_corrupted_pack_is_refused_with_a_clear_error(pack, tmp_path, how, message):
    store = Store(tmp_path / "store")
    store.save(pack)
    bad = tmp_path / "good"
    shutil.copytree(store.path("good"), bad)
    _corrupt(bad, how)
    before = _snapshot(store.root)
    with pytest.raises(PackError, match=message):
        load(bad)
    assert _snapshot(store.root) == before


def test_pack_of_another_model_is_refused(pack, tmp_path, bundled_path):
    Store(tmp_path).save(pack)
    with pytest.raises(PackError, match="was made for model"):
        Store(tmp_path).load("good", models.info(bundled_path))


def test_saving_over_an_existing_name_is_refused_and_keeps_the_old_pack(pack, tmp_path):
    store = Store(tmp_path)
    store.save(pack)
    before = _snapshot(tmp_path)
    with pytest.raises(PackError, match="already exists"):
        store.save(pack)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["../evil", "/etc/passwd", "a/b", "..", ".hidden", "", "x" * 65])
def test_names_that_could_leave_the_store_are_refused(tmp_path, name):
    store = Store(tmp_path)
    with pytest.raises(ValueError, match="invalid subspace name"):
        store.path(name)
    with pytest.raises(ValueError):
        store.delete(name)


# ---------------------------------------------------------------- durability and leftovers of crashed writes


def test_save_fsyncs_the_files_the_pack_directory_and_the_store(pack, tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store = Store(tmp_path)
    store.save(pack)
    staged = [p for p in synced if p.endswith("/manifest.json")][0].rsplit("/", 1)[0]
    assert Path(staged).parent == tmp_path and Path(staged).name.startswith(".good.")
    assert {f"{staged}/manifest.json", f"{staged}/bases.safetensors", staged} <= set(synced)
    assert synced[-1] == str(tmp_path)  # the rename into place, last
    synced.clear()
    store.delete("good")
    assert synced == [str(tmp_path)]


def test_atomic_write_fsyncs_the_file_and_then_its_directory(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    write_json(tmp_path / "d" / "x.json", {"a": 1})
    assert len(synced) == 2 and Path(synced[0]).parent == tmp_path / "d" and Path(synced[0]).name.startswith(".x.json.")
    assert synced[1] == str(tmp_path / "d")
    assert json.loads((tmp_path / "d" / "x.json").read_text()) == {"a": 1}


def test_a_writer_killed_mid_save_leaves_a_hidden_directory_that_the_next_store_removes(tmp_path):
    code = ("import os, sys; from pathlib import Path; from spd_engine.subspace import staging\n"
            "with staging(Path(sys.argv[1]), '.good.') as tmp:\n"
            "    (tmp / 'bases.safetensors').write_bytes(b'half')\n"
            "    os._exit(9)  # crash: no cleanup runs\n")
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=Path(__file__).parent.parent).returncode == 9
    trash = [tmp_path / ".good.old-1700000000000000000", tmp_path / ".gone.deleted-1700000000000000000",
             tmp_path / ".import-pack.abcd_123"]
    for t in trash:
        t.mkdir()
        (t / "manifest.json").write_text("{}")
    keep = [tmp_path / ".git", tmp_path / ".notes.txt", tmp_path / "README.md"]
    keep[0].mkdir()
    keep[1].write_text("x")
    keep[2].write_text("x")
    [left] = [p for p in tmp_path.iterdir() if p.name.startswith(".good.") and "old" not in p.name]
    store = Store(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in keep)
    assert store.clean() == [] and store.names() == []
    assert not left.exists()


def test_clean_leaves_a_staging_directory_that_a_running_writer_holds(tmp_path):
    with staging(tmp_path, ".good.") as tmp:
        assert Store(tmp_path).clean() == [] and tmp.is_dir()
    assert list(tmp_path.iterdir()) == []
    with staging(tmp_path, ".good.") as tmp:
        pass
    assert not tmp.exists()


def test_saving_while_another_store_object_cleans_does_not_lose_the_pack(pack, tmp_path):
    store = Store(tmp_path)
    stop = threading.Event()

    def cleaner():
        while not stop.is_set():
            Store(tmp_path)

    t = threading.Thread(target=cleaner)
    t.start()
    try:
        for _ in range(5):
            store.save(pack, overwrite=True)
            assert load(store.path("good")).name == "good"
    finally:
        stop.set()
        t.join()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good"]
