"""8. Hot paths on a running `spd serve --enable-lora`: the time to add a mode (POST /v1/modes/import:
into the store, no engine call; the worker loads it when a request first names it) and to load a
LoRA adapter (POST /v1/adapters, vLLM's runtime loading), and the latency of the first request
using each against a plain request just before. Each repetition a new mode and adapter name."""

import tempfile
import time
from pathlib import Path

import httpx

from common import MODEL, Context, Goal, headline, ratios, spread
from procs import save_random_mode

from server.harness import write_random_lora

TITLE = "hot paths: add a mode, load an adapter, first request after each"
USES = {"spd_server_lora"}
PROMPT = "Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:"


def run(ctx: Context) -> dict:
    from server.archive import export_pack
    from spd_engine import models
    from spd_engine.subspace import Store

    srv = ctx.resources.get("spd_server_lora")
    store = Path(tempfile.mkdtemp(prefix="bench-hp-store-"))  # the pack, as the import endpoint takes it
    pack_info = save_random_mode(store, "hp-src")
    tar = export_pack(Store(store), "hp-src")
    write_random_lora(models.resolve(MODEL), srv.root / "data" / "adapters" / "bench-lora")
    reps, max_tokens = ctx.size(1, 3), ctx.size(4, 8)
    client = httpx.Client(base_url=srv.url, timeout=600)

    def timed(method: str, path: str, **kw) -> float:
        t0 = time.perf_counter()
        client.request(method, path, **kw).raise_for_status()
        return time.perf_counter() - t0

    def complete(**extra) -> float:
        return timed("POST", "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens,
                                                      "temperature": 0.0, **extra})

    complete()  # warm-up
    out = {k: [] for k in ("plain_before_mode", "mode_add", "first_with_mode", "plain_before_adapter",
                           "adapter_load", "first_with_adapter")}
    for i in range(reps):
        mode, adapter = f"hp-mode-{i}", f"hp-lora-{i}"
        out["plain_before_mode"].append(complete())
        out["mode_add"].append(timed("POST", "/v1/modes/import", data={"name": mode},
                                     files={"file": ("pack.tar", tar, "application/x-tar")}))
        out["first_with_mode"].append(complete(capability=mode))
        out["plain_before_adapter"].append(complete())
        out["adapter_load"].append(timed("POST", "/v1/adapters", json={"name": adapter, "directory": "bench-lora"}))
        out["first_with_adapter"].append(complete(model=adapter))
        client.delete(f"/v1/adapters/{adapter}").raise_for_status()
        client.delete(f"/v1/modes/{mode}").raise_for_status()
    client.close()
    after_mode = ratios(out["first_with_mode"], out["plain_before_mode"])
    after_adapter = ratios(out["first_with_adapter"], out["plain_before_adapter"])
    return {
        "settings": {"reps": reps, "max_tokens": max_tokens, "pack": {**pack_info, "tar_bytes": len(tar)},
                     "server": srv.describe(),
                     "adapter": {"rank": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                                 "init": "random (not trained)"}},
        "seconds": out, "first_request_over_plain": {"mode": after_mode, "adapter": after_adapter},
        "headline": [headline("add a mode (pack import), seconds", spread(out["mode_add"]), Goal("<=", 1.0, "s")),
                     headline("load an adapter, seconds", spread(out["adapter_load"]), Goal("<=", 2.0, "s")),
                     headline("first request with the new mode / plain request (latency)", after_mode, None),
                     headline("first request with the new adapter / plain request (latency)", after_adapter, None)],
    }
