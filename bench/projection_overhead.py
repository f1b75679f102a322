"""1. Projection overhead on vLLM: tokens/s with every request in one mode (rank d/2 at the paper's
layers) / stock vLLM without the plugin, at batch 1, 8, 32; and the plugin's no-mode requests /
stock: its cost loaded but unused. Both engines run the same loop (bench/engine_worker.py), every
request makes exactly `max_tokens` tokens, the prefix cache is reset before every arm."""

from common import Context, Goal, compared, interleave, per_arm

TITLE = "vLLM: every request in one mode / stock vLLM without the plugin"
GOAL = Goal(">=", 0.98)
USES = {"plugin_engine", "stock_engine"}
MODE = "po-half"


def run(ctx: Context) -> dict:
    plugin, stock = ctx.resources.get("plugin_engine", "stock_engine")
    add = plugin.call("add_modes", names=[MODE], key=__name__)
    batches, reps = ctx.size([1, 8], [1, 8, 32]), ctx.size(1, 5)
    tokens = {1: ctx.size(4, 16), 8: ctx.size(4, 32), 32: ctx.size(4, 16)}  # a 30-minute suite on 2 cores
    for eng, caps in ((plugin, None), (stock, None), (plugin, [[MODE]] * 4)):  # warm-up: the worker loads the pack
        eng.call("run", batch=4, max_tokens=4, caps=caps)
    per_batch, heads = {}, []
    for b in batches:
        runs = interleave({"stock": stock.arm(b, tokens[b]), "plugin_one_mode": plugin.arm(b, tokens[b], [[MODE]] * b),
                           "plugin_no_mode": plugin.arm(b, tokens[b])}, reps, warmup=False)
        mode, h_mode = compared("one_mode_over_stock", f"one mode / stock, batch {b}", runs["plugin_one_mode"],
                                runs["stock"], GOAL if b >= 8 else None)
        idle, h_idle = compared("plugin_no_mode_over_stock", f"plugin loaded, no mode / stock, batch {b}",
                                runs["plugin_no_mode"], runs["stock"])
        per_batch[str(b)], heads = {**per_arm(runs), **mode, **idle}, heads + [h_mode, h_idle]
    return {"settings": {"batches": batches, "max_tokens_by_batch": tokens, "reps": reps, "ignore_eos": True,
                         "greedy": True, "mode": add["mode"], "prefix_cache": "reset before every arm",
                         "engines": {"plugin": plugin.state, "stock": stock.state}},
            "add_mode_seconds": add["add_seconds"], "worker_modes": plugin.call("remove_modes", names=[MODE]),
            "results": per_batch, "headline": heads}
