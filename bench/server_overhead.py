"""7. `spd serve` / `vllm serve` with the same flags: output tokens/s and requests/s of vLLM's
OpenAI server with this project's plugins (`python -m server --port P`, i.e. `spd serve` with its
defaults) / the same vLLM server without them (`python -m vllm.entrypoints.openai.api_server`
with the engine flags and vLLM environment settings `spd serve` passes, VLLM_PLUGINS=none: no plugin
loaded). Both: `spd serve`'s CPU defaults on this machine (the compiled engine with its compile
cache reloading, bfloat16 where the CPU has BF16 instructions, no reserved core on 2 CPUs), max-model-len 2048, VLLM_CPU_KVCACHE_SPACE=2, no LoRA,
vLLM's defaults for the rest.

Since the rework `spd serve` IS vLLM's server (it execs it with VLLM_PLUGINS naming
spd_kv_projection and spd_api), so the former comparison "our HTTP layer / vLLM's" is gone: what
is measured is what the two plugins cost in vLLM's own server (the front-end admission hook on
every request, the routing hook on every step, the capability-field middleware on the completion
routes), with requests that name no mode. A third arm sends the same load to `spd serve` with
every request in one mode (rank d/2 at layers 15 and 29, K and V; a random pack saved into the
server's store): the whole cost of serving steered requests, against the same stock baseline.

Load: closed-loop clients at concurrency 1, 8, 32, a fixed number of /v1/completions requests per
level (short prompts: the first sentence of distinct GSM8K questions, 10-30 tokens; greedy;
64 tokens each: ignore_eos), with p50/p99 latency. The load alternates between the servers, level
by level, round by round, the order rotated each round (A B C, B C A, C A B, ...), each run starting
once both servers are idle (`settle`: a server is still busy for a second or two after a burst,
which was measured against the next arm before 2026-11-29's second run). Two measures:
tokens per wall-clock second, and per CPU-second of the server's processes (API server, engine
core, worker: its process group), which does not count the time other jobs of a shared machine
held the cores.
"""
from __future__ import annotations

import asyncio
import statistics
import time

import httpx

from common import MODEL, Context, Goal, headline, ratios

NAME = "server_overhead"
TITLE = "spd serve / vllm serve (same flags): tokens/s at concurrency 1, 8, 32"
GOAL = Goal(">=", 0.98)
USES = {"spd_server", "vllm_server"}
MODE = "so-half"


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def short_prompts() -> list[str]:
    """The first sentence of every GSM8K question (distinct, short)."""
    from spd_engine.data import load_examples, resolve_data

    out = []
    for e in load_examples(resolve_data("gsm8k"), "math"):
        s = e.prompt.split(". ")[0].strip()
        out.append(s if s.endswith((".", "?")) else s + ".")
    return out


def measured(srv, prompts: list[str], concurrency: int, max_tokens: int, extra: dict | None = None) -> dict:
    """`load` against a server, with the CPU seconds its processes used meanwhile (in all and by
    process)."""
    c0 = srv.cpu_by_process()
    out = asyncio.run(load(srv.url, prompts, concurrency, max_tokens, extra))
    c1 = srv.cpu_by_process()
    out["cpu_seconds_by_process"] = {k: round(v - c0.get(k, 0.0), 2) for k, v in c1.items()}
    out["cpu_seconds"] = sum(c1.values()) - sum(c0.values())
    out["tok_per_cpu_s"] = out["tokens"] / max(out["cpu_seconds"], 1e-9)
    return out


def rotation(items: list, k: int) -> list:
    """`items` rotated by `k` (round k's order, so no arm always runs right after another)."""
    return items[k % len(items):] + items[:k % len(items)]


def run_ratios(num: list[dict], den: list[dict], key: str) -> dict:
    """Per-round ratios of `key` between two arms' runs (`common.ratios`)."""
    return ratios([x[key] for x in num], [x[key] for x in den])


def settle(servers, idle_share: float = 0.05, interval: float = 0.5, limit: float = 30.0) -> float:
    """Wait until all `servers` together use less than `idle_share` of one core over `interval`
    seconds (at most `limit` s); the seconds waited. A server stays busy for a second or two after
    a burst of requests (measured: 1.5-2 s waits), which would be measured against whichever
    server runs next."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        c0 = sum(s.cpu() for s in servers)
        time.sleep(interval)
        if sum(s.cpu() for s in servers) - c0 < idle_share * interval:
            break
    return time.perf_counter() - t0


def rotated_rounds(servers: dict, rounds: int, max_tokens: int, concurrency: int = 32) -> dict[str, list[dict]]:
    """`rounds` rounds of `measured` on every server (`concurrency` requests each), the order
    rotating from round to round so no server always runs right after another, each run starting
    once all servers are idle (`settle`); each round its own prompts."""
    prompts_all, names = short_prompts(), list(servers)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rnd in range(rounds):
        prompts = [prompts_all[(rnd * 37 + j) % len(prompts_all)] for j in range(concurrency)]
        for name in rotation(names, rnd):
            waited = settle(servers.values())
            runs[name].append({**measured(servers[name], prompts, concurrency, max_tokens), "settle_seconds": waited})
    return runs


def cores_busy(runs: list[dict]) -> dict[str, float]:
    """Where the cores went while one server was measured: CPU seconds by process / wall seconds."""
    wall = sum(x["seconds"] for x in runs)
    return {p: round(sum(x["cpu_seconds_by_process"].get(p, 0.0) for x in runs) / wall, 3)
            for p in runs[0]["cpu_seconds_by_process"]}


async def load(url: str, prompts: list[str], concurrency: int, max_tokens: int, extra: dict | None = None) -> dict:
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
                                                               "temperature": 0.0, "ignore_eos": True, **(extra or {})})
                latencies.append(time.perf_counter() - t0)
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"requests": len(prompts), "seconds": wall, "req_s": len(prompts) / wall, "tok_s": tokens / wall,
            "tokens": tokens, "latencies": latencies}


def save_random_mode(store_dir, name: str, seed: int = 0) -> dict:
    """A random pack of rank d/2 at the default layers, saved into a server's store (what the
    server serves: the next request can name it). A pack of that name already there is kept (a
    server shared by several benchmarks: the same seed made it)."""
    from spd_engine import models
    from spd_engine.calibrate import CalibrationConfig, calibrate, default_layers
    from spd_engine.subspace import Store

    info = models.info(models.resolve(MODEL))
    layers = default_layers(info.n_layers)
    pack = calibrate(None, None, info, "math", [], name,
                     CalibrationConfig(rank=info.kv_width // 2, layers=layers, method="random", seed=seed))
    if name not in Store(store_dir).names():
        Store(store_dir).save(pack)
    return {"name": name, "rank": info.kv_width // 2, "layers": layers, "kinds": ["k", "v"], "basis": "random"}


def greedy_text(url: str, prompt: str, extra: dict | None = None) -> str:
    """A greedy 24-token completion's text."""
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 24,
                                                  "temperature": 0.0, **(extra or {})}, timeout=300)
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def mode_check(spd_url: str, vllm_url: str, prompt: str) -> dict:
    """The same greedy completion from spd serve without a mode, in the mode, and from vllm serve:
    the mode arm must really project (its text differs), the no-mode arm must be vLLM's."""
    out = {"prompt": prompt, "spd": greedy_text(spd_url, prompt), "vllm": greedy_text(vllm_url, prompt),
           "spd_mode": greedy_text(spd_url, prompt, {"capability": MODE})}
    out["no_mode_equals_vllm"] = out["spd"] == out["vllm"]
    out["mode_changes_output"] = out["spd_mode"] != out["spd"]
    return out


def run(ctx: Context) -> dict:
    res = ctx.resources
    res.start("spd_server", "vllm_server")
    spd, vllm = res.get("spd_server"), res.get("vllm_server")
    mode = save_random_mode(spd.root / "store", MODE)
    targets = {"spd": (spd, None), "vllm": (vllm, None), "spd_mode": (spd, {"capability": MODE})}
    prompts_all = short_prompts()
    levels = ctx.size([1, 8], [1, 8, 32])
    n_requests = {1: ctx.size(2, 3), 8: ctx.size(8, 16), 32: ctx.size(32, 32)}
    max_tokens, rounds = ctx.size(8, 64), ctx.size(1, 4)
    for srv, extra in targets.values():  # warm-up (and the mode's first load in the worker)
        asyncio.run(load(srv.url, prompts_all[:8], 8, 4, extra))
    check = mode_check(spd.url, vllm.url, prompts_all[0])

    runs = {name: {str(c): [] for c in levels} for name in targets}
    for rnd in range(rounds):
        for c in levels:
            prompts = [prompts_all[(rnd * 41 + c * 7 + j) % len(prompts_all)] for j in range(n_requests[c])]
            for name, (srv, extra) in rotation(list(targets.items()), rnd):
                waited = settle([spd, vllm])
                runs[name][str(c)].append({**measured(srv, prompts, c, max_tokens, extra), "settle_seconds": waited})
    per_level, heads = {}, []
    for c in levels:
        k = str(c)
        base = runs["vllm"][k]
        tok = run_ratios(runs["spd"][k], base, "tok_s")
        req = run_ratios(runs["spd"][k], base, "req_s")
        tok_mode = run_ratios(runs["spd_mode"][k], base, "tok_s")
        cpu = run_ratios(runs["spd"][k], base, "tok_per_cpu_s")
        cpu_mode = run_ratios(runs["spd_mode"][k], base, "tok_per_cpu_s")
        lat = {name: {"p50": percentile([v for x in runs[name][k] for v in x["latencies"]], 0.5),
                      "p99": percentile([v for x in runs[name][k] for v in x["latencies"]], 0.99),
                      "mean": statistics.mean(v for x in runs[name][k] for v in x["latencies"])} for name in targets}
        per_level[k] = {"requests": n_requests[c], "tok_s_ratio": tok, "req_s_ratio": req,
                        "tok_s_ratio_spd_in_a_mode": tok_mode, "tok_per_cpu_s_ratio": cpu,
                        "tok_per_cpu_s_ratio_spd_in_a_mode": cpu_mode, "latency_seconds": lat,
                        "runs": {name: runs[name][k] for name in targets}}
        heads.append({**headline(f"tokens/s, concurrency {c}", tok, GOAL, cpu=cpu),
                      "p50": {n: lat[n]["p50"] for n in ("spd", "vllm")}, "p99": {n: lat[n]["p99"] for n in ("spd", "vllm")}})
        heads.append(headline(f"requests/s, concurrency {c}", req, None))
        heads.append(headline(f"tokens/s, every request in one mode (spd serve) / vllm serve, concurrency {c}",
                              tok_mode, None, cpu=cpu_mode))
    return {
        "settings": {"levels": levels, "requests_per_level": n_requests, "max_tokens": max_tokens, "rounds": rounds,
                     "greedy": True, "ignore_eos": True,
                     "endpoint": "/v1/completions, raw prompt: the first sentence of a GSM8K question",
                     "servers": {"spd": spd.describe(), "vllm": vllm.describe()}, "mode_arm": mode},
        "sanity": check,
        "levels": per_level,
        "headline": heads,
    }
