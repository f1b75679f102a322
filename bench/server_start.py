"""10. Start to first answer: `spd serve` / `vllm serve` with the same flags and vLLM settings, each
started fresh while nothing else of the suite runs, the order alternating per pair (A B, B A, ...)
so neither always has the file cache or the load drift on its side. From the spawn to the first
/v1/completions answer; also the CPU seconds its processes used until then (the work of starting,
without the time other jobs held the cores). Ours does more: the plugins register in every
process, and the endpoint plugin loads the tokenizer, opens the job store, starts the job worker.
"""
from __future__ import annotations

from common import Context, Goal, headline, ratios, spread
from procs import spd_server, vllm_server

TITLE = "start to first answer: spd serve - vllm serve (same flags), seconds"
GOAL = Goal("<=", 2.0, "s")


def run(ctx: Context) -> dict:
    reps = ctx.size(1, 3)
    described: dict[str, dict] = {}
    sec: dict[str, list[float]] = {"spd": [], "vllm": []}
    cpu: dict[str, list[float]] = {"spd": [], "vllm": []}
    order = [["spd", "vllm"] if i % 2 == 0 else ["vllm", "spd"] for i in range(reps)]
    for names in order:
        for n in names:
            srv = (spd_server if n == "spd" else vllm_server)(ctx.resources.logdir)
            try:
                described[n] = srv.describe()
                sec[n].append(srv.start_seconds)
                cpu[n].append(srv.start_cpu_seconds)
            finally:
                srv.close()
    diff = spread([a - b for a, b in zip(sec["spd"], sec["vllm"])])
    diff_cpu = spread([a - b for a, b in zip(cpu["spd"], cpu["vllm"])])
    r, r_cpu = ratios(sec["spd"], sec["vllm"]), ratios(cpu["spd"], cpu["vllm"])
    return {"settings": {"reps": reps, "servers": described,
                         "measure": "spawn -> first 200 from /v1/completions (max_tokens 1), polled every 0.25 s"},
            "seconds": sec, "cpu_seconds": cpu, "order": order, "difference_seconds": diff,
            "difference_cpu_seconds": diff_cpu, "ratio": r, "ratio_cpu": r_cpu,
            "headline": [headline("start to first answer: spd serve - vllm serve, seconds", diff, GOAL, cpu=diff_cpu),
                         headline("start to first answer: spd serve / vllm serve", r, None, cpu=r_cpu)]}
