"""7. `spd serve` / `vllm serve` with the same flags and vLLM settings: `spd serve` execs vLLM's own
server, so this is what the two plugins cost in it (admission, routing on every step, the
capability-field middleware) for requests naming no mode; a third arm sends every `spd serve`
request in one mode, the whole cost of steered requests. Concurrency 1, 8, 32, the arms rotating
round by round, each run once both servers are idle (procs.rotated_rounds)."""

from common import Context, Goal, headline, ratios, run_ratios
from procs import latency, prepared, rotated_rounds

TITLE = "spd serve / vllm serve (same flags): tokens/s at concurrency 1, 8, 32"
GOAL = Goal(">=", 0.98)
USES = {"spd_server", "vllm_server"}
MODE = "so-half"


def run(ctx: Context) -> dict:
    spd, vllm = ctx.resources.get("spd_server", "vllm_server")
    targets = {"spd": (spd, None), "vllm": (vllm, None), "spd_mode": (spd, {"capability": MODE})}
    levels = {1: ctx.size(2, 3), 8: ctx.size(8, 16), **({} if ctx.quick else {32: 32})}  # concurrency: requests
    max_tokens, rounds = ctx.size(8, 64), ctx.size(1, 4)
    mode, check = prepared(targets, MODE, 8)
    runs = rotated_rounds(targets, rounds, levels, max_tokens)
    per_level, heads = {}, []
    for c, k in ((c, str(c)) for c in levels):
        base = runs["vllm"][k]
        tok, cpu = run_ratios(runs["spd"][k], base)
        tok_mode, cpu_mode = run_ratios(runs["spd_mode"][k], base)
        req = ratios([x["req_s"] for x in runs["spd"][k]], [x["req_s"] for x in base])
        lat = {name: latency(runs[name][k]) for name in targets}
        per_level[k] = {"requests": levels[c], "tok_s_ratio": tok, "req_s_ratio": req, "tok_s_ratio_spd_in_a_mode": tok_mode,
                        "tok_per_cpu_s_ratio": cpu, "tok_per_cpu_s_ratio_spd_in_a_mode": cpu_mode,
                        "latency_seconds": lat, "runs": {name: runs[name][k] for name in targets}}
        heads += [{**headline(f"tokens/s, concurrency {c}", tok, GOAL, cpu=cpu),
                   **{q: {n: lat[n][q] for n in ("spd", "vllm")} for q in ("p50", "p99")}},
                  headline(f"requests/s, concurrency {c}", req, None),
                  headline(f"tokens/s, every request in one mode (spd serve) / vllm serve, concurrency {c}",
                           tok_mode, None, cpu=cpu_mode)]
    return {"settings": {"levels": list(levels), "requests_per_level": levels, "max_tokens": max_tokens, "rounds": rounds,
                         "greedy": True, "ignore_eos": True, "servers": {"spd": spd.describe(), "vllm": vllm.describe()},
                         "mode_arm": mode},
            "sanity": check, "levels": per_level, "headline": heads}
