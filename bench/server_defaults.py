"""9. `spd serve` with its defaults / `vllm serve` with its defaults: tokens/s at concurrency 32, and
each one's start to its first answer (issue 15's goal: ours no slower; how the defaults were chosen:
README, Performance). Ours reloads its compile cache (its start is measured with the cache a
previous start left); vLLM 0.32's recompiles at every start here. 16 rounds: rounds vary by +-20%.
Not in --quick: the compiled start alone takes minutes."""

from common import Context, Goal, headline, run_ratios, spread
from procs import latency, prepared, rotated_rounds

TITLE = "spd serve (its defaults) / vllm serve (its defaults, compiled): tokens/s at concurrency 32"
GOAL = Goal(">=", 1.3)  # issue 15's
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
    concurrency = n_requests = 32
    max_tokens, rounds = ctx.size(8, 64), ctx.size(1, 16)
    targets = {n: (s, None) for n, s in servers.items()}
    mode, check = prepared(targets, MODE, 32)
    runs = {n: v[str(concurrency)] for n, v in rotated_rounds(targets, rounds, {concurrency: n_requests}, max_tokens).items()}
    tok, cpu = run_ratios(runs["spd"], runs["vllm_defaults"])
    lat, starts = {n: latency(runs[n]) for n in servers}, {n: s.start_seconds for n, s in servers.items()}
    busy = {n: cores_busy(runs[n]) for n in servers}
    print(f"[bench]   cores busy by process while measured: {busy}", flush=True)
    def start_row(label: str, seconds: float, goal: Goal | None = None) -> dict:
        return headline(f"start to first answer: {label}, seconds", spread([seconds]), goal, "s")

    return {
        "settings": {"concurrency": concurrency, "requests": n_requests, "max_tokens": max_tokens, "rounds": rounds,
                     "greedy": True, "ignore_eos": True, "servers": {n: s.describe() for n, s in servers.items()},
                     "mode_check_pack": mode},
        "sanity": check, "runs": runs, "tok_s": {n: spread([x["tok_s"] for x in runs[n]]) for n in servers},
        "latency_seconds": lat, "start_to_first_answer_seconds": starts, "tok_s_ratio": tok, "tok_per_cpu_s_ratio": cpu,
        "cores_busy_by_process": busy,
        "headline": [{**headline("tokens/s, concurrency 32, each with its defaults", tok, GOAL, cpu=cpu),
                      **{q: {n: lat[n][q] for n in servers} for q in ("p50", "p99")}},
                     start_row("spd serve - vllm serve, each with its defaults", starts["spd"] - starts["vllm_defaults"],
                               Goal("<=", 0.0, "s")),
                     start_row("spd serve with its defaults", starts["spd"]),
                     start_row("vllm serve with its defaults (compiled engine)", starts["vllm_defaults"])],
    }
