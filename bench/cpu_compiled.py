"""16. vLLM's compiled engine with a compile cache that reloads / the eager engine, for `spd serve`
on a CPU: tokens/s at concurrency 32, and start to first answer with the compile cache cold and warm.

vLLM 0.32 on torch 2.13 cannot load its AOT compile cache ("'function' object has no attribute
'finalize_loading'", vllm/compilation/decorators.py `_try_load_aot_compiled_fn`), so its compiled
engine (its default) recompiles at every start; cpu_defaults therefore measured it with a 1.3-3x
slower start. With VLLM_USE_AOT_COMPILE=0, vLLM's own switch, it keeps its previous compile cache,
which reloads. Both servers are `spd serve` with its CPU defaults for the rest (dtype, threads)
given explicitly: eager (`--enforce-eager`) and compiled (`--no-enforce-eager`,
VLLM_USE_AOT_COMPILE=0) on fresh compile caches (VLLM_CACHE_ROOT and TORCHINDUCTOR_CACHE_DIR in a
temporary directory: a machine's first start),
started twice: the first start compiles (cold), the second reloads (warm) and is the one measured.
Both run at once, each run starting once both are idle (`server_overhead.settle`), the rounds
rotating which goes first. Each must also
project (a request in a random mode changes its text); and batch invariance is counted as in
cpu_defaults (of 96 concurrent greedy answers, how many differ from the same request alone).
"""
from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

from common import Context, headline, spd_serve_vllm, spread
from cpu_defaults import batch_mismatches, projects
from procs import spd_server
from server_overhead import MODE, cores_busy, load, rotated_rounds, run_ratios, save_random_mode, short_prompts

NAME = "cpu_compiled"
TITLE = "spd serve, compiled engine with its compile cache reloading / eager: tokens/s at concurrency 32, starts"
GOAL = None  # a sweep: the defaults it chose are judged by server_defaults
USES: set[str] = set()
QUICK = False


def run(ctx: Context) -> dict:
    cmd, base_env = spd_serve_vllm([])
    dtype = ["--dtype", cmd[cmd.index("--dtype") + 1]]
    cache = Path(tempfile.mkdtemp(prefix="bench-vllm-cache-"))
    arms = {"eager": ([*dtype, "--enforce-eager"], base_env),
            "compiled": ([*dtype, "--no-enforce-eager"], {**base_env, "VLLM_USE_AOT_COMPILE": "0",
                                                          "VLLM_CACHE_ROOT": str(cache / "vllm"),
                                                          "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor")})}
    logdir, prompts_all = ctx.resources.logdir, short_prompts()
    max_tokens, rounds = ctx.size(8, 64), ctx.size(1, 12)
    servers, starts = {}, {}
    try:
        cold = spd_server(logdir, arms["compiled"][0], name="compiled-cold", timeout=1800.0, env=arms["compiled"][1])
        starts["compiled, compile cache cold"] = cold.start_seconds
        cold.close()
        for name, (flags, env) in arms.items():
            servers[name] = spd_server(logdir, flags, name=name, timeout=1800.0, env=env)
        starts["compiled, compile cache warm"] = servers["compiled"].start_seconds
        starts["eager"] = servers["eager"].start_seconds
        checks = {}
        for name, srv in servers.items():
            save_random_mode(srv.root / "store", MODE)
            checks[name] = {"mode_changes_output": projects(srv.url, prompts_all[0]),
                            "concurrent_answers_differing_from_alone": batch_mismatches(srv.url)}
            asyncio.run(load(srv.url, prompts_all[:32], 32, 4))  # warm-up
        runs = rotated_rounds(servers, rounds, max_tokens)
        described = {n: s.describe() for n, s in servers.items()}
    finally:
        for srv in servers.values():
            srv.close()
        shutil.rmtree(cache, ignore_errors=True)
    tok = run_ratios(runs["compiled"], runs["eager"], "tok_s")
    cpu = run_ratios(runs["compiled"], runs["eager"], "tok_per_cpu_s")
    busy = {n: cores_busy(runs[n]) for n in runs}
    print(f"[bench]   checks {checks}; cores busy by process {busy}", flush=True)
    return {
        "settings": {"concurrency": 32, "requests": 32, "max_tokens": max_tokens, "rounds": rounds, "greedy": True,
                     "ignore_eos": True, "arms": {n: {"flags": f, "env": e} for n, (f, e) in arms.items()},
                     "servers": described},
        "checks": checks,
        "start_to_first_answer_seconds": {k: round(v, 2) for k, v in starts.items()},
        "runs": runs,
        "tok_s": {n: spread([x["tok_s"] for x in runs[n]]) for n in runs},
        "tok_s_ratio": tok,
        "tok_per_cpu_s_ratio": cpu,
        "cores_busy_by_process": busy,
        "headline": [headline("compiled (compile cache reloading) / eager, tokens/s at concurrency 32", tok, None, cpu=cpu),
                     *(headline(f"start to first answer, {k}, seconds", spread([v]), None, unit="s")
                       for k, v in starts.items())],
    }
