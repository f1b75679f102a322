"""Failure handling: packs that are corrupted or belong elsewhere are refused, the store is unchanged."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from spd_engine import models
from spd_engine.calibrate import CalibrationConfig, calibrate
from spd_engine.subspace import PackError, Store, load
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
