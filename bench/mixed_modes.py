"""2. Mixed modes: one batch spread over 4 modes and no mode / the same batch all in one mode, on the
plugin engine (each mode loaded by the worker before the measurement). With the chat template every
prompt shares a system prompt, and the plugin salts the prefix cache per mode (K/V computed under
one mode differ under another), so a batch in one mode shares those blocks and a mixed one only
within each mode; a second pair of arms on the bare questions (no prefix block shared) leaves only
the cost of routing and projecting several modes in one step."""
from __future__ import annotations

from common import Context, Goal, by_key, headline, interleave, run_ratios

TITLE = "vLLM: a batch over 4 modes + none / the same batch in one mode"
GOAL = Goal(">=", 0.97)
USES = {"plugin_engine"}
MODES = ["mm-1", "mm-2", "mm-3", "mm-4"]


def run(ctx: Context) -> dict:
    plugin = ctx.resources.get("plugin_engine")
    width, n = plugin.state["kv_width"], plugin.state["n_layers"]
    layers = sorted({n // 2, n - 1})
    plugin.call("use_worker_modes", key=__name__)  # a worker mode set of its own: only these modes loaded
    plugin.call("add_modes", names=MODES, rank=width // 2, layers=layers, kinds=["k", "v"])
    batch, tokens, reps = ctx.size(10, 32), ctx.size(4, 24), ctx.size(1, 4)
    groups = [[m] for m in MODES] + [[]]
    mixed, one = [groups[i % len(groups)] for i in range(batch)], [[MODES[0]]] * batch
    plugin.call("run", batch=4, max_tokens=4, caps=[[m] for m in MODES])  # every mode loaded once

    def arm(caps, style):
        return lambda i: plugin.call("run", batch=batch, max_tokens=tokens, caps=caps, style=style)

    runs = interleave({"one_mode": arm(one, "chat"), "mixed": arm(mixed, "chat"),
                       "one_mode_raw": arm(one, "raw"), "mixed_raw": arm(mixed, "raw")}, reps, warmup=False)
    r, r_cpu = run_ratios(runs["mixed"], runs["one_mode"])
    r_raw, r_raw_cpu = run_ratios(runs["mixed_raw"], runs["one_mode_raw"])
    worker = plugin.call("worker_modes")
    plugin.call("remove_modes", names=MODES)
    plugin.call("use_worker_modes", key="default")
    return {
        "settings": {"batch": batch, "max_tokens": tokens, "reps": reps, "ignore_eos": True, "greedy": True,
                     "modes": {"n": len(MODES), "rank": width // 2, "layers": layers, "kinds": ["k", "v"],
                               "basis": "random (cost only)"},
                     "mixed_assignment": "request i -> [mm-1, mm-2, mm-3, mm-4, none][i % 5]",
                     "prompts": {"chat": "the math task's prompt through the chat template (shared system prompt)",
                                 "raw": "the bare GSM8K question (no shared prefix block)"},
                     "prefix_cache": "reset before every arm; per-mode salts set by the plugin's front end"},
        "worker_modes": worker, "tok_s": by_key(runs, "tok_s"), "tok_per_cpu_s": by_key(runs, "tok_per_cpu_s"),
        "mixed_over_one_mode": r, "mixed_over_one_mode_cpu": r_cpu,
        "mixed_over_one_mode_raw_prompts": r_raw, "mixed_over_one_mode_raw_prompts_cpu": r_raw_cpu,
        "headline": [headline(f"4 modes + none / one mode, batch {batch} (chat-template prompts)", r, GOAL, cpu=r_cpu),
                     headline(f"same, bare prompts with no shared prefix (routing and projection only), batch {batch}",
                              r_raw, None, cpu=r_raw_cpu)],
    }
