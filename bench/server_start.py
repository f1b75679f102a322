"""10. Start to first answer: `spd serve` / `vllm serve` with the same flags and settings, each started
fresh while nothing else of the suite runs, the order alternating per pair so neither always has the
file cache or the load drift on its side; also the CPU seconds to then (the work of starting). Ours
does more: the plugins register in every process, the endpoint plugin loads the tokenizer, opens the
job store and starts the job worker."""

from common import Context, Goal, headline, ratios, spread
from procs import spd_server, vllm_server

TITLE = "start to first answer: spd serve - vllm serve (same flags), seconds"
GOAL = Goal("<=", 2.0, "s")


def run(ctx: Context) -> dict:
    reps = ctx.size(1, 3)
    described, sec, cpu = {}, {"spd": [], "vllm": []}, {"spd": [], "vllm": []}
    order = [["spd", "vllm"] if i % 2 == 0 else ["vllm", "spd"] for i in range(reps)]
    for n in (n for names in order for n in names):
        srv = (spd_server if n == "spd" else vllm_server)(ctx.resources.logdir)
        described[n] = srv.describe()
        sec[n].append(srv.start_seconds)
        cpu[n].append(srv.start_cpu_seconds)
        srv.stop()
    diff, diff_cpu = (spread([a - b for a, b in zip(x["spd"], x["vllm"])]) for x in (sec, cpu))
    r, r_cpu = ratios(sec["spd"], sec["vllm"]), ratios(cpu["spd"], cpu["vllm"])
    return {"settings": {"reps": reps, "servers": described,
                         "measure": "spawn -> first 200 from /v1/completions (max_tokens 1), polled every 0.25 s"},
            "seconds": sec, "cpu_seconds": cpu, "order": order, "difference_seconds": diff,
            "difference_cpu_seconds": diff_cpu, "ratio": r, "ratio_cpu": r_cpu,
            "headline": [headline("start to first answer: spd serve - vllm serve, seconds", diff, GOAL, cpu=diff_cpu),
                         headline("start to first answer: spd serve / vllm serve", r, None, cpu=r_cpu)]}
