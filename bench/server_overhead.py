"""7. Server overhead: requests/s and output tokens/s of our server (`--backend vllm`) / vLLM's own
OpenAI server (`python -m vllm.entrypoints.openai.api_server`, no plugin loaded) on the same
engine settings (float32, eager, 32 sequences, max_model_len 2048, prefix caching on, seed 0,
VLLM_CPU_KVCACHE_SPACE=2) and the same load: closed-loop clients at concurrency 1, 8, 32, a fixed
number of /v1/completions requests (raw prompts, greedy, max_tokens tokens each: ignore_eos), with p50/p99 latency.
The load alternates between the two servers, level by level, round by round (A B A B).

Both run their engine core in a process of its own (ours: VLLMBackend(engine_process=True), one
engine thread in the HTTP process stepping it; requests join the running batch at the next step).
"""
from __future__ import annotations

import asyncio
import statistics
import time

import httpx

from common import MODEL, Context, Goal, headline, ratios

NAME = "server_overhead"
TITLE = "our server / vLLM's OpenAI server: requests/s and tokens/s at concurrency 1, 8, 32"
GOAL = Goal(">=", 0.95)
USES = {"spd_server", "vllm_server"}


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def load(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    latencies, tokens = [], 0
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:
        async def user():
            nonlocal tokens
            while True:
                try:
                    p = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                t0 = time.perf_counter()
                r = await client.post("/v1/completions", json={"model": MODEL, "prompt": p, "max_tokens": max_tokens,
                                                               "temperature": 0.0, "ignore_eos": True})
                latencies.append(time.perf_counter() - t0)
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"requests": len(prompts), "seconds": wall, "req_s": len(prompts) / wall, "tok_s": tokens / wall,
            "tokens": tokens, "latencies": latencies}


def run(ctx: Context) -> dict:
    from spd_engine.data import load_examples, resolve_data

    res = ctx.resources
    res.start("spd_server", "vllm_server")
    servers = {"spd": res.get("spd_server"), "vllm": res.get("vllm_server")}
    gsm = load_examples(resolve_data("gsm8k"), "math")
    questions = [f"Question: {e.prompt}\nAnswer:" for e in gsm]
    levels = ctx.size([1, 8], [1, 8, 32])
    n_requests = {1: ctx.size(2, 3), 8: ctx.size(8, 16), 32: ctx.size(32, 32)}
    max_tokens, rounds = ctx.size(4, 16), ctx.size(1, 3)
    for srv in servers.values():  # warm-up
        asyncio.run(load(srv.url, questions[:8], 8, 4))

    runs = {name: {str(c): [] for c in levels} for name in servers}
    for rnd in range(rounds):
        for c in levels:
            prompts = [questions[(rnd * 37 + j) % len(questions)] for j in range(n_requests[c])]
            for name, srv in servers.items():
                runs[name][str(c)].append(asyncio.run(load(srv.url, prompts, c, max_tokens)))
    per_level, heads = {}, []
    for c in levels:
        k = str(c)
        a, b = runs["spd"][k], runs["vllm"][k]
        tok = ratios([x["tok_s"] for x in a], [x["tok_s"] for x in b])
        req = ratios([x["req_s"] for x in a], [x["req_s"] for x in b])
        lat = {name: {"p50": percentile([v for x in runs[name][k] for v in x["latencies"]], 0.5),
                      "p99": percentile([v for x in runs[name][k] for v in x["latencies"]], 0.99),
                      "mean": statistics.mean(v for x in runs[name][k] for v in x["latencies"])} for name in servers}
        per_level[k] = {"requests": n_requests[c], "tok_s_ratio": tok, "req_s_ratio": req, "latency_seconds": lat,
                        "runs": {name: runs[name][k] for name in servers}}
        heads.append({**headline(f"tokens/s, concurrency {c}", tok, GOAL),
                      "p50": {n: lat[n]["p50"] for n in servers}, "p99": {n: lat[n]["p99"] for n in servers}})
        heads.append(headline(f"requests/s, concurrency {c}", req, GOAL))
    return {
        "settings": {"levels": levels, "requests_per_level": n_requests, "max_tokens": max_tokens, "rounds": rounds,
                     "greedy": True, "ignore_eos": True,
                     "endpoint": "/v1/completions, raw prompt 'Question: <gsm8k question>\\nAnswer:'",
                     "vllm_server": "VLLM_PLUGINS= (no plugin), --enforce-eager --max-num-seqs 32 --max-model-len 2048 "
                                    "--enable-prefix-caching --dtype float32 --seed 0, VLLM_CPU_KVCACHE_SPACE=2",
                     "start_seconds": {n: s.start_seconds for n, s in servers.items()}},
        "levels": per_level,
        "headline": heads,
    }
