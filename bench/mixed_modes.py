"""2. Mixed modes: one batch spread over 4 modes + requests without a mode / the same batch with
every request in one mode, on the plugin engine (4 modes loaded in both arms: same bank).

Requests carry their mode's prefix-cache salt, as served: a batch in one mode shares its prompts'
common prefix (the chat template's system prompt) in the prefix cache, a mixed batch shares it
only within each mode. A third arm, mixed without salts, separates that from the cost of routing
and projecting several modes in one step (cost only: unsalted modes must never be served).
"""
from __future__ import annotations

from common import Context, Goal, headline, interleave, ratios

NAME = "mixed_modes"
TITLE = "vLLM: a batch over 4 modes + none / the same batch in one mode"
GOAL = Goal(">=", 0.97)
USES = {"plugin_engine"}
MODES = ["mm-1", "mm-2", "mm-3", "mm-4"]


def run(ctx: Context) -> dict:
    plugin = ctx.resources.get("plugin_engine")
    width, n = plugin.state["kv_width"], plugin.state["n_layers"]
    layers = sorted({n // 2, n - 1})
    for i, m in enumerate(MODES):
        plugin.call("add_mode", name=m, rank=width // 2, layers=layers, kinds=["k", "v"], seed=i)
    batch, tokens, reps = ctx.size(10, 32), ctx.size(4, 24), ctx.size(1, 3)
    groups = MODES + [None]
    mixed = [[groups[i % len(groups)]] if groups[i % len(groups)] else [] for i in range(batch)]
    one = [[MODES[0]]] * batch
    plugin.call("run", batch=4, max_tokens=4, caps=[[m] for m in MODES])  # warm-up: every slot once

    def arm(caps, salt=True):
        return lambda i: plugin.call("run", batch=batch, max_tokens=tokens, caps=caps, salt=salt)["tok_s"]

    tok_s = interleave({"one_mode": arm(one), "mixed": arm(mixed), "mixed_unsalted": arm(mixed, salt=False)},
                       reps, warmup=False)
    r = ratios(tok_s["mixed"], tok_s["one_mode"])
    r_cost = ratios(tok_s["mixed_unsalted"], tok_s["one_mode"])
    for m in MODES:
        plugin.call("remove_mode", name=m)
    return {
        "settings": {"batch": batch, "max_tokens": tokens, "reps": reps, "ignore_eos": True, "greedy": True,
                     "modes": {"n": len(MODES), "rank": width // 2, "layers": layers, "kinds": ["k", "v"],
                               "basis": "random (cost only)"},
                     "mixed_assignment": "request i -> [mm-1, mm-2, mm-3, mm-4, none][i % 5]",
                     "prefix_cache": "reset before every arm"},
        "tok_s": tok_s,
        "mixed_over_one_mode": r,
        "mixed_unsalted_over_one_mode": r_cost,
        "headline": [headline(f"4 modes + none / one mode, batch {batch}", r, GOAL),
                     headline(f"same, mixed batch without per-mode cache salts (routing cost only), batch {batch}",
                              r_cost, None)],
    }
