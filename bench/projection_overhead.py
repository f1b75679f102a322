"""1. Projection overhead on vLLM: output tokens/s with every request in one mode (rank d/2 at the
paper's layers, K and V) / stock vLLM without the plugin (its own engine process, VLLM_PLUGINS=none)
at batch 1, 8, 32; and the plugin engine's no-mode requests / stock: what the plugin costs loaded
but unused. Both engines run the same loop (bench/engine_worker.py), every request makes exactly
`max_tokens` tokens and the prefix cache is reset before every arm, so every arm does the same
prefill + decode."""
from __future__ import annotations

from common import Context, Goal, by_key, headline, interleave, run_ratios

TITLE = "vLLM: every request in one mode / stock vLLM without the plugin"
GOAL = Goal(">=", 0.98)
USES = {"plugin_engine", "stock_engine"}
MODE = "po-half"


def run(ctx: Context) -> dict:
    plugin, stock = ctx.resources.get("plugin_engine", "stock_engine")
    width, n = plugin.state["kv_width"], plugin.state["n_layers"]  # d: n_kv_heads x head_dim
    layers = sorted({n // 2, n - 1})  # the paper's middle and last layers
    plugin.call("use_worker_modes", key=__name__)  # a worker mode set of its own: only this mode loaded
    add = plugin.call("add_modes", names=[MODE], rank=width // 2, layers=layers, kinds=["k", "v"])
    batches = ctx.size([1, 8], [1, 8, 32])
    tokens = {1: ctx.size(4, 16), 8: ctx.size(4, 32), 32: ctx.size(4, 16)}  # a 30-minute suite on 2 cores
    reps = ctx.size(1, 5)
    for eng in (plugin, stock):
        eng.call("run", batch=4, max_tokens=4)
    plugin.call("run", batch=4, max_tokens=4, caps=[[MODE]] * 4)  # the worker loads the pack

    def arm(eng, b, mode):
        return lambda i: eng.call("run", batch=b, max_tokens=tokens[b], caps=[[mode] if mode else []] * b)

    per_batch, heads = {}, []
    for b in batches:
        runs = interleave({"stock": arm(stock, b, None), "plugin_one_mode": arm(plugin, b, MODE),
                           "plugin_no_mode": arm(plugin, b, None)}, reps, warmup=False)
        r, r_cpu = run_ratios(runs["plugin_one_mode"], runs["stock"])
        idle, idle_cpu = run_ratios(runs["plugin_no_mode"], runs["stock"])
        per_batch[str(b)] = {"tok_s": by_key(runs, "tok_s"), "tok_per_cpu_s": by_key(runs, "tok_per_cpu_s"),
                             "one_mode_over_stock": r, "one_mode_over_stock_cpu": r_cpu,
                             "plugin_no_mode_over_stock": idle, "plugin_no_mode_over_stock_cpu": idle_cpu}
        heads.append(headline(f"one mode / stock, batch {b}", r, GOAL if b >= 8 else None, cpu=r_cpu))
        heads.append(headline(f"plugin loaded, no mode / stock, batch {b}", idle, None, cpu=idle_cpu))
    worker = plugin.call("worker_modes")
    plugin.call("remove_modes", names=[MODE])
    plugin.call("use_worker_modes", key="default")
    return {"settings": {"batches": batches, "max_tokens_by_batch": tokens, "reps": reps, "ignore_eos": True,
                         "greedy": True, "mode": {"rank": width // 2, "layers": layers, "kinds": ["k", "v"],
                                                  "basis": "random (cost only)"},
                         "prefix_cache": "reset before every arm", "engines": {"plugin": plugin.state, "stock": stock.state}},
            "add_mode_seconds": add["add_seconds"], "worker_modes": worker, "results": per_batch, "headline": heads}
