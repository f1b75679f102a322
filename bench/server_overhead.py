"""7. `spd serve` / `vllm serve` with the same flags and vLLM settings (`spd serve`'s CPU defaults, no
LoRA; VLLM_PLUGINS=none for vLLM): `spd serve` execs vLLM's own server, so this is what the two
plugins cost in it (admission on every request, routing on every step, the capability-field
middleware) for requests naming no mode. A third arm sends every `spd serve` request in one mode (a
random rank-d/2 pack in its store): the whole cost of steered requests against the same baseline.

Closed-loop clients at concurrency 1, 8, 32, greedy /v1/completions of 64 tokens each (ignore_eos)
on the first sentence of distinct GSM8K questions; round by round the arms take turns, the order
rotating, each run once both servers are idle (procs.settle). Tokens per wall-clock second and per
CPU-second of the server's processes; p50/p99 latency."""
from __future__ import annotations

from common import Context, Goal, headline, ratios, run_ratios
from procs import latency, mode_check, rotated_rounds, save_random_mode, short_prompts, warm_up

TITLE = "spd serve / vllm serve (same flags): tokens/s at concurrency 1, 8, 32"
GOAL = Goal(">=", 0.98)
USES = {"spd_server", "vllm_server"}
MODE = "so-half"


def run(ctx: Context) -> dict:
    spd, vllm = ctx.resources.get("spd_server", "vllm_server")
    mode = save_random_mode(spd.root / "store", MODE)
    targets = {"spd": (spd, None), "vllm": (vllm, None), "spd_mode": (spd, {"capability": MODE})}
    levels = {1: ctx.size(2, 3), 8: ctx.size(8, 16), **({} if ctx.quick else {32: 32})}  # concurrency: requests
    max_tokens, rounds = ctx.size(8, 64), ctx.size(1, 4)
    warm_up(targets.values(), 8)  # and the worker's first load of the mode
    check = mode_check(spd.url, vllm.url, short_prompts()[0], MODE)
    runs = rotated_rounds(targets, [spd, vllm], rounds, levels, max_tokens)
    per_level, heads = {}, []
    for c, k in ((c, str(c)) for c in levels):
        base = runs["vllm"][k]
        tok, cpu = run_ratios(runs["spd"][k], base)
        tok_mode, cpu_mode = run_ratios(runs["spd_mode"][k], base)
        req = ratios([x["req_s"] for x in runs["spd"][k]], [x["req_s"] for x in base])
        lat = {name: latency(runs[name][k]) for name in targets}
        per_level[k] = {"requests": levels[c], "tok_s_ratio": tok, "req_s_ratio": req, "tok_s_ratio_spd_in_a_mode": tok_mode,
                        "tok_per_cpu_s_ratio": cpu, "tok_per_cpu_s_ratio_spd_in_a_mode": cpu_mode,
                        "latency_seconds": lat, "runs": {name: runs[name][k] for name in targets}}
        heads.append({**headline(f"tokens/s, concurrency {c}", tok, GOAL, cpu=cpu),
                      **{q: {n: lat[n][q] for n in ("spd", "vllm")} for q in ("p50", "p99")}})
        heads.append(headline(f"requests/s, concurrency {c}", req, None))
        heads.append(headline(f"tokens/s, every request in one mode (spd serve) / vllm serve, concurrency {c}",
                              tok_mode, None, cpu=cpu_mode))
    return {"settings": {"levels": list(levels), "requests_per_level": levels, "max_tokens": max_tokens, "rounds": rounds,
                         "greedy": True, "ignore_eos": True,
                         "endpoint": "/v1/completions, raw prompt: the first sentence of a GSM8K question",
                         "servers": {"spd": spd.describe(), "vllm": vllm.describe()}, "mode_arm": mode},
            "sanity": check, "levels": per_level, "headline": heads}
