"""17. `capability: "auto"`: which mode `spd serve` picks for held-out prompts of three domains
(rank-16 modes calibrated through the API on GSM8K, BIG-bench date_understanding, HumanEval; the
`x-spd-capability` header says what was applied), and what picking costs against naming the mode it
chose. A numbered first line makes each prompt unique per repetition: no arm is served from the
prefix cache."""

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
from common import MODEL, Context, Goal, headline, interleave, ratios, spread
from procs import job_record, spd_server

from spd_engine.data import load_examples, resolve_data
from spd_engine.tasks import user_message

TITLE = "capability auto: the mode chosen per domain (confusion table) and tokens/s against naming the mode"
GOAL = Goal(">=", 0.95)
DOMAINS = {"math": ("gsm8k", "math"), "mcq": ("bigbench/date_understanding", "mcq"), "code": ("humaneval", "code")}
RANK = 16


def _chat(http: httpx.Client, content: str, capability: str | None, max_tokens: int) -> tuple[str, int]:
    r = http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": True, "capability": capability}).raise_for_status()
    return r.headers["x-spd-capability"], r.json()["usage"]["completion_tokens"]


def run(ctx: Context) -> dict:
    n_cal, n_held = ctx.size(4, 32), ctx.size(2, 30)
    requests, tokens, reps = ctx.size(8, 64), ctx.size(4, 32), ctx.size(1, 3)
    srv = spd_server(ctx.resources.logdir, name="auto")
    try:
        limits = httpx.Limits(max_connections=40, max_keepalive_connections=40)
        http = httpx.Client(base_url=srv.url, timeout=900, limits=limits)
        t0 = time.perf_counter()
        posted = [http.post("/v1/modes", json={"name": name, "task": task, "rank": RANK, "calibration": {
            "dataset": dataset, "limit": n_cal}}).raise_for_status() for name, (dataset, task) in DOMAINS.items()]
        for r in posted:  # the three jobs run meanwhile
            job_record(http, r.json()["id"], 2.0)
        calibration_s = time.perf_counter() - t0
        prompts = {name: [user_message(task, ex) for ex in load_examples(
            resolve_data(dataset) if dataset != "humaneval" else dataset, task)[n_cal:n_cal + n_held]]
            for name, (dataset, task) in DOMAINS.items()}  # held out: after the calibration items
        chosen = {(d, c): _chat(http, c, "auto", 1)[0] for d, cs in prompts.items() for c in cs}
        confusion = {d: dict(Counter(chosen[(d, c)] or "none" for c in cs)) for d, cs in prompts.items()}
        correct = sum(confusion[d].get(d, 0) for d in DOMAINS) / len(chosen)

        items = [(c, chosen[(d, c)]) for d, cs in prompts.items() for c in cs]
        load = [items[i % len(items)] for i in range(requests)]
        pool = ThreadPoolExecutor(32)

        def arm(auto: bool):
            def once(rep: int) -> float:
                t0 = time.perf_counter()
                got = pool.map(lambda ic: _chat(http, f"Request {rep}.{ic[0]}.{int(auto)}\n{ic[1][0]}",
                                                "auto" if auto else ic[1][1] or None, tokens)[1], enumerate(load))
                return sum(got) / (time.perf_counter() - t0)
            return once

        tok_s = interleave({"auto": arm(True), "named": arm(False)}, reps)
        pool.shutdown()
        r = ratios(tok_s["auto"], tok_s["named"])
        modes = {d: {"dataset": ds, "task": k, "rank": RANK, "calibration_items": n_cal} for d, (ds, k) in DOMAINS.items()}
        return {
            "settings": {"server": srv.describe(), "modes": modes, "held_out_per_domain": n_held, "cost": {"requests": requests,
                         "concurrency": 32, "max_tokens": tokens, "ignore_eos": True, "reps": reps, "greedy": True}},
            "calibration_seconds": round(calibration_s, 1), "confusion": confusion, "chosen_correctly": correct,
            "chance": 1 / len(DOMAINS), "tok_s": tok_s, "auto_over_named": r,
            "headline": [headline(f"auto / the mode it chose named, concurrency 32, {tokens} tokens", r, GOAL),
                         headline("held-out prompts given their own domain's mode", spread([correct]), None, unit="fraction")],
        }
    finally:
        srv.stop()
