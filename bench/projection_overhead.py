"""1. Projection overhead on vLLM: output tokens/s with every request in one mode (layers 15 and
29, K and V, rank d/2) / stock vLLM without the plugin (a separate engine process started with
`VLLM_PLUGINS=none`), at batch 1, 8, 32. The plugin arm is the library's VLLMBackend (the mode a
pack saved into its store; the plugin admits, salts and projects); the stock arm is vLLM's `LLM`
with the same engine settings, driven by the same loop. The plugin engine's own no-mode requests
are a third arm: what the plugin costs when it is loaded but no request asks for a mode.

Each request produces exactly `max_tokens` tokens (EOS ignored) and the prefix cache is reset
before every arm, so every arm does the same work: prefill + decode of the same prompts. Two
measures per arm: output tokens per wall-clock second, and per CPU-second of the engine process
(`cpu` in the JSON: insensitive to the time other jobs hold the cores of a shared machine).
"""
from __future__ import annotations

from common import Context, Goal, headline, interleave, ratios

NAME = "projection_overhead"
TITLE = "vLLM: every request in one mode / stock vLLM without the plugin"
GOAL = Goal(">=", 0.98)
USES = {"plugin_engine", "stock_engine"}
MODE = "po-half"


def run(ctx: Context) -> dict:
    res = ctx.resources
    res.start("plugin_engine", "stock_engine")
    plugin, stock = res.get("plugin_engine"), res.get("stock_engine")
    width = plugin.state["kv_width"]  # d: n_kv_heads x head_dim (192 on SmolLM2-135M)
    n = plugin.state["n_layers"]
    layers = sorted({n // 2, n - 1})  # the paper's middle and last layers (15, 29)
    plugin.call("use_worker_modes", key=NAME)  # a worker mode set of its own: only this mode loaded
    add = plugin.call("add_mode", name=MODE, rank=width // 2, layers=layers, kinds=["k", "v"])
    batches = ctx.size([1, 8], [1, 8, 32])
    tokens = {1: ctx.size(4, 16), 8: ctx.size(4, 32), 32: ctx.size(4, 16)}  # sized for a 30-min suite on 2 cores
    reps = ctx.size(1, 5)
    for eng in (plugin, stock):  # warm-up once per engine
        eng.call("run", batch=4, max_tokens=4)
    plugin.call("run", batch=4, max_tokens=4, caps=[[MODE]] * 4)  # the worker loads the pack

    def arm(eng, batch, mode):
        return lambda i: eng.call("run", batch=batch, max_tokens=tokens[batch], caps=[[mode] if mode else []] * batch,
                                  offset=0)

    per_batch, heads = {}, []
    for b in batches:
        runs = interleave({"stock": arm(stock, b, None), "plugin_one_mode": arm(plugin, b, MODE),
                           "plugin_no_mode": arm(plugin, b, None)}, reps, warmup=False)
        tok_s = {k: [x["tok_s"] for x in v] for k, v in runs.items()}
        tok_cpu = {k: [x["tok_per_cpu_s"] for x in v] for k, v in runs.items()}
        r, r_cpu = ratios(tok_s["plugin_one_mode"], tok_s["stock"]), ratios(tok_cpu["plugin_one_mode"], tok_cpu["stock"])
        idle, idle_cpu = (ratios(tok_s["plugin_no_mode"], tok_s["stock"]),
                          ratios(tok_cpu["plugin_no_mode"], tok_cpu["stock"]))
        per_batch[str(b)] = {"tok_s": tok_s, "tok_per_cpu_s": tok_cpu, "one_mode_over_stock": r,
                             "one_mode_over_stock_cpu": r_cpu, "plugin_no_mode_over_stock": idle,
                             "plugin_no_mode_over_stock_cpu": idle_cpu}
        heads.append(headline(f"one mode / stock, batch {b}", r, GOAL if b >= 8 else None, cpu=r_cpu))
        heads.append(headline(f"plugin loaded, no mode / stock, batch {b}", idle, None, cpu=idle_cpu))
    worker = plugin.call("worker_modes")
    plugin.call("remove_mode", name=MODE)
    plugin.call("use_worker_modes", key="default")
    return {
        "settings": {"batches": batches, "max_tokens_by_batch": tokens, "reps": reps, "ignore_eos": True, "greedy": True,
                     "mode": {"rank": width // 2, "layers": layers, "kinds": ["k", "v"], "basis": "random (cost only)"},
                     "prefix_cache": "reset before every arm", "engines": {"plugin": plugin.state, "stock": stock.state}},
        "add_mode_seconds": add["add_seconds"],
        "worker_modes": worker,
        "results": per_batch,
        "headline": heads,
    }
