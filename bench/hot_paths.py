"""8. Hot paths on a running `spd serve` (started with `--enable-lora --max-lora-rank 8 --max-loras
2`, the flags an adapter needs; LoRA is off by default): the time to add a mode (importing an
existing pack: POST /v1/subspaces/import, which validates it and installs it in the store the
server serves; no engine call: the workers load it when a request first names it; calibration is
not part of it), the time to load a LoRA adapter (POST /v1/adapters from the adapters dir, through
vLLM's runtime LoRA loading), and the latency of the first request that uses each (the mode's
first request pays for the worker loading the pack), beside a plain request measured just before.
Each repetition uses a new mode name and adapter name (then deletes them).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import httpx

from common import MODEL, Context, Goal, headline, ratios, spread

NAME = "hot_paths"
TITLE = "hot paths: add a mode, load an adapter, first request after each"
GOAL = None
MODE_GOAL = Goal("<=", 1.0, "s")
ADAPTER_GOAL = Goal("<=", 2.0, "s")
USES = {"spd_server_lora"}
PROMPT = "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:"


def make_pack_tar(rank: int) -> tuple[bytes, dict]:
    from server.archive import export_pack
    from spd_engine import models
    from spd_engine.calibrate import CalibrationConfig, calibrate
    from spd_engine.subspace import Store

    path = models.resolve(MODEL)
    info = models.info(path)
    pack = calibrate(None, None, info, "math", [], "hp-src", CalibrationConfig(rank=rank, method="random"))
    store = Store(Path(tempfile.mkdtemp(prefix="bench-hp-store-")))
    store.save(pack)
    data = export_pack(store, "hp-src")
    return data, {"rank": rank, "layers": pack.manifest.layers, "kinds": pack.manifest.kinds, "tar_bytes": len(data)}


def make_adapter(out: Path, rank: int = 8) -> dict:
    from peft import LoraConfig, get_peft_model

    from spd_engine import models

    model, _ = models.load(models.resolve(MODEL), "cpu")
    lora = LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM", init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(out)
    return {"rank": rank, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "init": "random (not trained)"}


def run(ctx: Context) -> dict:
    from spd_engine import models

    srv = ctx.resources.get("spd_server_lora")
    width = models.info(models.resolve(MODEL)).kv_width
    tar, pack_info = make_pack_tar(width // 2)
    adapter_info = make_adapter(srv.root / "data" / "adapters" / "bench-lora")
    reps, max_tokens = ctx.size(1, 3), ctx.size(4, 8)
    client = httpx.Client(base_url=srv.url, timeout=600)

    def complete(**extra) -> float:
        t0 = time.perf_counter()
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens,
                                                 "temperature": 0.0, **extra})
        dt = time.perf_counter() - t0
        r.raise_for_status()
        return dt

    complete()  # warm-up
    out = {k: [] for k in ("plain_before_mode", "mode_add", "first_with_mode", "plain_before_adapter",
                           "adapter_load", "first_with_adapter")}
    for i in range(reps):
        mode, adapter = f"hp-mode-{i}", f"hp-lora-{i}"
        out["plain_before_mode"].append(complete())
        t0 = time.perf_counter()
        r = client.post("/v1/subspaces/import", files={"file": ("pack.tar", tar, "application/x-tar")},
                        data={"name": mode})
        out["mode_add"].append(time.perf_counter() - t0)
        r.raise_for_status()
        out["first_with_mode"].append(complete(capability=mode))
        out["plain_before_adapter"].append(complete())
        t0 = time.perf_counter()
        r = client.post("/v1/adapters", json={"name": adapter, "directory": "bench-lora"})
        out["adapter_load"].append(time.perf_counter() - t0)
        r.raise_for_status()
        out["first_with_adapter"].append(complete(model=adapter))
        client.delete(f"/v1/adapters/{adapter}").raise_for_status()
        client.delete(f"/v1/subspaces/{mode}").raise_for_status()
    client.close()
    after_mode = ratios(out["first_with_mode"], out["plain_before_mode"])
    after_adapter = ratios(out["first_with_adapter"], out["plain_before_adapter"])
    return {
        "settings": {"reps": reps, "max_tokens": max_tokens, "pack": pack_info, "adapter": adapter_info,
                     "mode_add": "POST /v1/subspaces/import (multipart tar), client wall time",
                     "adapter_load": "POST /v1/adapters {directory}, client wall time",
                     "server": srv.describe()},
        "seconds": out,
        "first_request_over_plain": {"mode": after_mode, "adapter": after_adapter},
        "headline": [headline("add a mode (pack import), seconds", spread(out["mode_add"]), MODE_GOAL),
                     headline("load an adapter, seconds", spread(out["adapter_load"]), ADAPTER_GOAL),
                     headline("first request with the new mode / plain request (latency)", after_mode, None),
                     headline("first request with the new adapter / plain request (latency)", after_adapter, None)],
    }
