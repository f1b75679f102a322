"""7. `spd serve` / `vllm serve` with the same flags: output tokens/s and requests/s of vLLM's
OpenAI server with this project's plugins (`python -m server --port P`, `spd serve` with its
defaults) / the same server without them (`vllm.entrypoints.openai.api_server` with the flags and
vLLM settings `spd serve` passes, VLLM_PLUGINS=none). Both with `spd serve`'s CPU defaults on this
machine, max-model-len 2048, a 2 GiB KV cache, no LoRA.

`spd serve` execs vLLM's own server, so what is measured is what the two plugins cost in it (the
admission hook on every request, the routing hook on every step, the capability-field middleware),
with requests that name no mode. A third arm sends the same load to `spd serve` with every request
in one mode (rank d/2 at layers 15 and 29, K and V; a random pack in its store): the whole cost of
serving steered requests, against the same baseline.

Load: closed-loop clients at concurrency 1, 8, 32, a fixed number of greedy /v1/completions per
level (the first sentence of distinct GSM8K questions, 64 tokens each with ignore_eos), p50/p99
latency. Round by round and level by level the arms take turns, the order rotating each round, each
run starting once both servers are idle (procs.settle). Tokens per wall-clock second and per
CPU-second of the server's processes (API server, engine core, worker).
"""
from __future__ import annotations

import asyncio

from common import Context, Goal, headline, ratios, run_ratios
from procs import latency, load, mode_check, rotated_rounds, save_random_mode, short_prompts

NAME = "server_overhead"
TITLE = "spd serve / vllm serve (same flags): tokens/s at concurrency 1, 8, 32"
GOAL = Goal(">=", 0.98)
USES = {"spd_server", "vllm_server"}
MODE = "so-half"


def run(ctx: Context) -> dict:
    ctx.resources.start("spd_server", "vllm_server")
    spd, vllm = ctx.resources.get("spd_server"), ctx.resources.get("vllm_server")
    mode = save_random_mode(spd.root / "store", MODE)
    targets = {"spd": (spd, None), "vllm": (vllm, None), "spd_mode": (spd, {"capability": MODE})}
    prompts = short_prompts()
    levels = {1: ctx.size(2, 3), 8: ctx.size(8, 16), **({} if ctx.quick else {32: 32})}  # concurrency: requests
    max_tokens, rounds = ctx.size(8, 64), ctx.size(1, 4)
    for srv, extra in targets.values():  # warm-up, and the worker's first load of the mode
        asyncio.run(load(srv.url, prompts[:8], 8, 4, extra))
    check = mode_check(spd.url, vllm.url, prompts[0], MODE)
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
