"""9. `spd serve` with its defaults / `vllm serve` with its defaults: tokens/s at concurrency 32, and
each one's start to its first answer (issue 15's goal: ours no slower). How the defaults were
chosen: README, Performance. `spd serve` here runs vLLM's compiled engine with its compile cache
reloading (its start is measured with the cache a previous start left); `vllm serve`
(VLLM_PLUGINS=none) recompiles at every start (vLLM 0.32's cache does not reload here), with
VLLM_CPU_KVCACHE_SPACE=2 because its CPU default refuses to start on this machine. server_overhead's
load and rotation; 16 rounds, as rounds vary by +-20% here. Skipped in --quick runs: the compiled
start alone takes minutes."""
from __future__ import annotations

from common import Context, Goal, headline, run_ratios, spread
from procs import latency, mode_check, rotated_rounds, save_random_mode, short_prompts, warm_up

TITLE = "spd serve (its defaults) / vllm serve (its defaults, compiled): tokens/s at concurrency 32"
GOAL = Goal(">=", 1.3)  # issue 15; issue 11 asked >= 0.98
USES = {"spd_server", "vllm_server_defaults"}
QUICK = False  # a compiled server's start takes minutes
MODE = "so-half"


def cores_busy(runs: list[dict]) -> dict[str, float]:
    """Where the cores went while one server was measured: CPU seconds by process / wall seconds."""
    wall = sum(x["seconds"] for x in runs)
    return {p: round(sum(x["cpu_seconds_by_process"].get(p, 0.0) for x in runs) / wall, 3)
            for p in runs[0]["cpu_seconds_by_process"]}


def run(ctx: Context) -> dict:
    # one start at a time (not get(a, b)): their start times are reported
    servers = {"spd": ctx.resources.get("spd_server"), "vllm_defaults": ctx.resources.get("vllm_server_defaults")}
    mode = save_random_mode(servers["spd"].root / "store", MODE)
    check = mode_check(servers["spd"].url, servers["vllm_defaults"].url, short_prompts()[0], MODE)
    concurrency = n_requests = 32
    max_tokens, rounds = ctx.size(8, 64), ctx.size(1, 16)
    warm_up([(s, None) for s in servers.values()], 32)
    by_level = rotated_rounds({n: (s, None) for n, s in servers.items()}, list(servers.values()), rounds,
                              {concurrency: n_requests}, max_tokens)
    runs = {n: v[str(concurrency)] for n, v in by_level.items()}
    tok, cpu = run_ratios(runs["spd"], runs["vllm_defaults"])
    lat = {n: latency(runs[n]) for n in servers}
    starts = {n: s.start_seconds for n, s in servers.items()}
    busy = {n: cores_busy(runs[n]) for n in servers}
    print(f"[bench]   cores busy by process while measured: {busy}", flush=True)
    return {
        "settings": {"concurrency": concurrency, "requests": n_requests, "max_tokens": max_tokens, "rounds": rounds,
                     "greedy": True, "ignore_eos": True,
                     "endpoint": "/v1/completions, raw prompt: the first sentence of a GSM8K question",
                     "servers": {n: s.describe() for n, s in servers.items()}, "mode_check_pack": mode},
        "sanity": check, "runs": runs, "tok_s": {n: spread([x["tok_s"] for x in runs[n]]) for n in servers},
        "latency_seconds": lat, "start_to_first_answer_seconds": starts, "tok_s_ratio": tok, "tok_per_cpu_s_ratio": cpu,
        "cores_busy_by_process": busy,
        "headline": [{**headline("tokens/s, concurrency 32, each with its defaults", tok, GOAL, cpu=cpu),
                      **{q: {n: lat[n][q] for n in servers} for q in ("p50", "p99")}},
                     headline("start to first answer: spd serve - vllm serve, each with its defaults, seconds",
                              spread([starts["spd"] - starts["vllm_defaults"]]), Goal("<=", 0.0, "s")),
                     headline("start to first answer: spd serve with its defaults, seconds",
                              spread([starts["spd"]]), None, unit="s"),
                     headline("start to first answer: vllm serve with its defaults (compiled engine), seconds",
                              spread([starts["vllm_defaults"]]), None, unit="s")],
    }
