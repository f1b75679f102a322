"""2. Mixed modes: one batch over 4 modes and no mode / the same batch in one mode, on the plugin
engine. The plugin salts the prefix cache per mode (K/V under one mode differ under another), so
with the chat template's shared system prompt a mixed batch shares fewer blocks; the second pair of
arms, on bare questions (no prefix block shared), leaves only the cost of routing several modes."""

from common import Context, Goal, compared, interleave, per_arm

TITLE = "vLLM: a batch over 4 modes + none / the same batch in one mode"
GOAL = Goal(">=", 0.97)
USES = {"plugin_engine"}
MODES = ["mm-1", "mm-2", "mm-3", "mm-4"]


def run(ctx: Context) -> dict:
    plugin = ctx.resources.get("plugin_engine")
    added = plugin.call("add_modes", names=MODES, key=__name__)
    batch, tokens, reps = ctx.size(10, 32), ctx.size(4, 24), ctx.size(1, 4)
    groups = [[m] for m in MODES] + [[]]
    mixed, one = [groups[i % len(groups)] for i in range(batch)], [[MODES[0]]] * batch
    plugin.call("run", batch=4, max_tokens=4, caps=[[m] for m in MODES])  # every mode loaded once

    runs = interleave({"one_mode": plugin.arm(batch, tokens, one), "mixed": plugin.arm(batch, tokens, mixed),
                       "one_mode_raw": plugin.arm(batch, tokens, one, "raw"),
                       "mixed_raw": plugin.arm(batch, tokens, mixed, "raw")}, reps, warmup=False)
    chat, h_chat = compared("mixed_over_one_mode", f"4 modes + none / one mode, batch {batch} (chat-template prompts)",
                            runs["mixed"], runs["one_mode"], GOAL)
    raw, h_raw = compared("mixed_over_one_mode_raw_prompts", "same, bare prompts with no shared prefix (routing and "
                          f"projection only), batch {batch}", runs["mixed_raw"], runs["one_mode_raw"])
    return {
        "settings": {"batch": batch, "max_tokens": tokens, "reps": reps, "ignore_eos": True, "greedy": True,
                     "modes": {"n": len(MODES), **added["mode"]},
                     "mixed_assignment": "request i -> [mm-1, mm-2, mm-3, mm-4, none][i % 5]"},
        "worker_modes": plugin.call("remove_modes", names=MODES), **per_arm(runs), **chat, **raw,
        "headline": [h_chat, h_raw],
    }
