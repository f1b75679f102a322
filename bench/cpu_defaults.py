"""14. CPU settings for `spd serve`: each candidate / `vllm serve` with its defaults, tokens/s at
concurrency 32, and each one's start to first answer.

The sweep behind `spd serve`'s CPU defaults (issue 15). vLLM's OpenAI server with its own
defaults (bfloat16 on x86, compiled, VLLM_CPU_KVCACHE_SPACE=2: its CPU default refuses to start
here) runs throughout as the baseline; the candidates are started one at a time, each as
`spd serve` with every knob of the sweep given explicitly (so the sweep keeps its meaning when the
defaults change), and measured round by round alternately with the baseline (A B A B ...): one
ratio per round. Knobs:

- dtype: float32 or bfloat16 (bfloat16 runs on the AVX-512 BF16 / AMX kernels where the CPU has
  them; on an AVX2-only CPU it is emulated and slower, SPD_SPEC);
- eager (`--enforce-eager`) or compiled (`--no-enforce-eager`, vLLM's default: torch.compile at
  every start on this vLLM build);
- OpenMP threads of the model worker: vLLM's automatic binding keeps one core for the engine core
  and API server (`VLLM_CPU_NUM_OF_RESERVED_CPU=1`, on 2 cores: one OpenMP thread), or reserves
  none (`=0`: one thread per core, sharing them with the API server), or no binding at all
  (`VLLM_CPU_OMP_THREADS_BIND=nobind`: torch's default thread count, unpinned);
- OpenMP's wait policy: threads spin between parallel regions (the default) or sleep
  (`OMP_WAIT_POLICY=PASSIVE`), leaving the core to the API server and scheduler.

Each candidate must also project: a request in a random mode gives another greedy text than
without. And each is checked for batch invariance: 8 prompts without a mode, each asked alone,
then 4 copies of each at once (32 concurrent), 3 times: how many of the 96 concurrent answers
differ from the same request alone (vLLM's float32 kernels give 0; its bfloat16 ones change
greedy tokens with the batch's shape). Skipped in --quick runs (the compiled starts take minutes).
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from common import Context, headline, spread
from procs import spd_server
from server_overhead import MODE, greedy_text, load, measured, run_ratios, save_random_mode, short_prompts

NAME = "cpu_defaults"
TITLE = "CPU settings for spd serve / vllm serve with its defaults: tokens/s at concurrency 32, start time"
GOAL = None  # a sweep: the defaults it chose are judged by server_defaults
USES = {"vllm_server_defaults"}
QUICK = False

EAGER, COMPILED = "--enforce-eager", "--no-enforce-eager"
CANDIDATES = {  # name: (spd serve flags, environment)
    "float32 eager, 1 thread": (["--dtype", "float32", EAGER], {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}),
    "float32 eager, 2 threads": (["--dtype", "float32", EAGER], {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}),
    "bfloat16 eager, 1 thread": (["--dtype", "bfloat16", EAGER], {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}),
    "bfloat16 eager, 2 threads": (["--dtype", "bfloat16", EAGER], {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}),
    "bfloat16 eager, 2 threads, passive wait": (["--dtype", "bfloat16", EAGER], {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                                                                               "OMP_WAIT_POLICY": "PASSIVE"}),
    "bfloat16 eager, unbound": (["--dtype", "bfloat16", EAGER], {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}),
    "bfloat16 compiled, 1 thread": (["--dtype", "bfloat16", COMPILED], {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}),
    "bfloat16 compiled, 2 threads": (["--dtype", "bfloat16", COMPILED], {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}),
}


def projects(url: str, prompt: str) -> bool:
    """A request in the random mode gives another greedy text than the same request without one."""
    return greedy_text(url, prompt, {"capability": MODE}) != greedy_text(url, prompt)


BATCH_PROMPTS = ["Count to five:", "My favourite fruit is", "Write one sentence about the sea and the sky at night:",
                 "2 + 2 =", "The capital of France is", "Once upon a time", "def add(a, b):",
                 "Tom has 3 apples and buys 5 more."]


def batch_mismatches(url: str, copies: int = 4, repeats: int = 3) -> dict:
    """Greedy answers (no mode) that differ between a request alone and the same request among
    `copies` x 8 concurrent ones."""
    alone = {p: greedy_text(url, p) for p in BATCH_PROMPTS}
    work = BATCH_PROMPTS * copies
    differ = 0
    for _ in range(repeats):
        with ThreadPoolExecutor(len(work)) as pool:
            differ += sum(alone[p] != t for p, t in zip(work, pool.map(lambda p: greedy_text(url, p), work)))
    return {"differ": differ, "of": repeats * len(work)}


def run(ctx: Context, candidates: dict | None = None) -> dict:
    candidates = candidates or CANDIDATES
    base = ctx.resources.get("vllm_server_defaults")
    prompts_all = short_prompts()
    concurrency, n_requests, max_tokens, rounds = 32, 32, ctx.size(8, 64), ctx.size(1, 5)
    asyncio.run(load(base.url, prompts_all[:32], 32, 4))  # warm-up
    out, heads = {}, []
    for i, (name, (flags, env)) in enumerate(candidates.items()):
        srv = spd_server(ctx.resources.logdir, flags, name=f"sweep{i}", timeout=1800.0, env=env)
        try:
            save_random_mode(srv.root / "store", MODE)
            check = projects(srv.url, prompts_all[0])
            invariance = batch_mismatches(srv.url)
            asyncio.run(load(srv.url, prompts_all[:32], 32, 4))  # warm-up
            runs = {"candidate": [], "vllm_defaults": []}
            for rnd in range(rounds):
                prompts = [prompts_all[(i * 53 + rnd * 37 + j) % len(prompts_all)] for j in range(n_requests)]
                runs["candidate"].append(measured(srv, prompts, concurrency, max_tokens))
                runs["vllm_defaults"].append(measured(base, prompts, concurrency, max_tokens))
            for r in runs.values():
                for x in r:
                    x.pop("latencies")
            tok = run_ratios(runs["candidate"], runs["vllm_defaults"], "tok_s")
            cpu = run_ratios(runs["candidate"], runs["vllm_defaults"], "tok_per_cpu_s")
            out[name] = {"server": srv.describe(), "mode_changes_output": check,
                         "concurrent_answers_differing_from_alone": invariance, "tok_s_ratio": tok,
                         "tok_per_cpu_s_ratio": cpu,
                         "tok_s": {k: spread([x["tok_s"] for x in v]) for k, v in runs.items()},
                         "start_to_first_answer_seconds": round(srv.start_seconds, 2), "runs": runs}
        finally:
            srv.close()
        heads.append(headline(f"{name} / vllm serve defaults, tokens/s at concurrency 32", tok, None, cpu=cpu))
        heads.append(headline(f"{name}: start to first answer, seconds", spread([srv.start_seconds]), None, unit="s"))
        print(f"[bench]   {name}: {tok['median']:.3f} {tok['values']}, start {srv.start_seconds:.1f} s, "
              f"projects {check}, {invariance['differ']} of {invariance['of']} differ in a batch", flush=True)
    heads.append(headline("vllm serve defaults: start to first answer, seconds", spread([base.start_seconds]),
                          None, unit="s"))
    return {
        "settings": {"concurrency": concurrency, "requests": n_requests, "max_tokens": max_tokens, "rounds": rounds,
                     "greedy": True, "ignore_eos": True,
                     "endpoint": "/v1/completions, raw prompt: the first sentence of a GSM8K question",
                     "baseline": base.describe(),
                     "candidates": {k: {"flags": f, "env": e} for k, (f, e) in candidates.items()}},
        "candidates": out,
        "headline": heads,
    }
