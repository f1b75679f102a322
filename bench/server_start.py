"""10. Start to first answer: `spd serve` / `vllm serve` with the same flags and vLLM settings
(`spd serve`'s defaults on this machine; vLLM's with VLLM_PLUGINS=none), each started fresh,
alternately (spd vllm spd vllm ...), nothing else of the suite running. Time from the spawn of the
process to the first /v1/completions that answers 200 (a 1-token completion, polled every 0.25 s),
then the server is stopped. The order alternates per pair (A B, B A, ...). Also the CPU seconds
the server's processes (its process group) used from the spawn to that answer: the work of
starting, without the time other jobs of a shared machine held the cores. Reported: ours minus vLLM's, per pair of starts (seconds), and the
ratio. Ours does more at start: the plugins register in every process (the K/V patch checks the
model's attention layers), and the endpoint plugin loads the tokenizer, opens the job store and
starts the job worker.
"""
from __future__ import annotations

from common import Context, Goal, headline, ratios, spread

NAME = "server_start"
TITLE = "start to first answer: spd serve - vllm serve (same flags), seconds"
GOAL = Goal("<=", 2.0, "s")
USES: set[str] = set()


def run(ctx: Context) -> dict:
    from procs import spd_server, vllm_server

    logdir = ctx.resources.logdir
    reps = ctx.size(1, 3)
    described: dict[str, dict] = {}

    cpu: dict[str, list[float]] = {"spd": [], "vllm": []}

    def start(factory, name):
        def f(i):
            srv = factory(logdir)
            try:
                described[name] = srv.describe()
                cpu[name].append(srv.start_cpu_seconds)
                return srv.start_seconds
            finally:
                srv.close()
        return f

    arms = {"spd": start(spd_server, "spd"), "vllm": start(vllm_server, "vllm")}
    sec: dict[str, list[float]] = {"spd": [], "vllm": []}
    order = []
    for i in range(reps):  # A B, B A, A B, ...: neither arm always starts first (file cache, load drift)
        names = ["spd", "vllm"] if i % 2 == 0 else ["vllm", "spd"]
        order.append(names)
        for n in names:
            sec[n].append(arms[n](i))
    diff = spread([a - b for a, b in zip(sec["spd"], sec["vllm"])])
    diff_cpu = spread([a - b for a, b in zip(cpu["spd"], cpu["vllm"])])
    r = ratios(sec["spd"], sec["vllm"])
    r_cpu = ratios(cpu["spd"], cpu["vllm"])
    return {
        "settings": {"reps": reps, "servers": described, "measure": "spawn -> first 200 from /v1/completions "
                     "(max_tokens 1), polled every 0.25 s"},
        "seconds": sec,
        "cpu_seconds": cpu,
        "order": order,
        "difference_seconds": diff,
        "difference_cpu_seconds": diff_cpu,
        "ratio": r,
        "ratio_cpu": r_cpu,
        "headline": [headline("start to first answer: spd serve - vllm serve, seconds", diff, GOAL, cpu=diff_cpu),
                     headline("start to first answer: spd serve / vllm serve", r, None, cpu=r_cpu)],
    }
