"""11. Many modes on the vLLM backend: one batch of 64 requests spread over 1, 8, 32 or 64 distinct
modes / the same batch with every request in one mode; 256 modes loaded but one used / one
loaded; a composition of 4 modes / one mode; and the curve beside EasySteer's.

The engine is the plugin engine (the library's VLLMBackend, 64 sequences). Every mode is a random
pack of rank d/2 = 96 at 2 layers (15 and 29), K and V, saved into the backend's store: the
plugin's front end admits each request against the store and salts it per mode, and the worker
loads a pack when a request first names it. Request i of a batch over k modes is in mode i mod k.
The prompts are the bare GSM8K questions (no chat template: they share no prefix block, so the
per-mode prefix-cache salts cannot favour the one-mode batch; the prefix cache is reset before
every arm anyway); exactly `max_tokens` tokens per request (ignore_eos), greedy; tokens/s of the
whole batch, prefill included, per wall-clock second and per CPU-second of the engine process.
Arms interleaved, one ratio per repetition.

"Loaded": the worker keeps at most 64 modes (`ModeCache(max_modes=64)`, least recently used
evicted first), so "256 modes loaded" means 256 packs in the store, each admitted and loaded by the
worker once before the measurement (4 batches of 64 distinct modes), after which the worker holds
the 64 most recently used: its bank has 64 slots (64 x 96 columns per site) while the measured
batch uses one of them. The baseline is the same engine with a fresh worker mode set that has
loaded only that one mode (`use_worker_modes` swaps the plugin's `ModeCache` between the two
states: same process, model, KV cache and scheduler).

A composition of 4 modes is one slot whose basis spans the union of the 4 bases: four random rank-96
bases in width 192 span all 192 dimensions, so its rank is 192 (projection = identity, the cost of
a rank-192 projection).

EasySteer (github.com/ZJU-REAL/EasySteer, its efficiency README): throughput in a batch of 256 on a
GPU with no steering 30,633 tok/s; with 1 steering configuration 23,211; 8: 19,923; 32: 15,851;
256: 5,620. Plotted beside ours, each relative to its own no-steering throughput (different
hardware, model and batch: the shapes of the curves are comparable, not the absolute numbers).
"""
from __future__ import annotations

from common import Context, Goal, headline, interleave, ratios

NAME = "many_modes"
TITLE = "vLLM: 1-64 distinct modes in a batch of 64 / one mode; 256 loaded, one used / one loaded; 4 composed / one"
GOAL = None  # one goal per row below
GOALS = {"distinct_32": Goal(">=", 0.95), "loaded": Goal(">=", 0.98), "composition": Goal(">=", 0.95)}
USES = {"plugin_engine"}
EASYSTEER = {"source": "EasySteer, efficiency README (github.com/ZJU-REAL/EasySteer)",
             "setting": "batch of 256 on a GPU, throughput in tokens/s",
             "tok_s": {"0": 30633, "1": 23211, "8": 19923, "32": 15851, "256": 5620}}


def run(ctx: Context) -> dict:
    plugin = ctx.resources.get("plugin_engine")
    width, n_layers = plugin.state["kv_width"], plugin.state["n_layers"]
    layers = sorted({n_layers // 2, n_layers - 1})
    rank = width // 2
    batch = ctx.size(8, 64)
    ks = ctx.size([8], [8, 32, 64])
    n_store = ctx.size(16, 256)
    tokens, reps = ctx.size(4, 16), ctx.size(1, 5)
    names = [f"mm-{i:03d}" for i in range(n_store)]
    plugin.call("use_worker_modes", key=NAME)  # a worker mode set of its own: no mode of other benchmarks
    added = plugin.call("add_modes", names=names, rank=rank, layers=layers, kinds=["k", "v"])

    def spread_over(k):
        return [[names[i % k]] for i in range(batch)]

    batches = {"none": [[] for _ in range(batch)], "one_mode": spread_over(1)}
    batches.update({f"distinct_{k}": spread_over(k) for k in ks})
    batches["composition_4"] = [names[:4]] * batch

    def arm(caps):
        return lambda i: plugin.call("run", batch=batch, max_tokens=tokens if i >= 0 else 1, caps=caps,
                                     style="raw")

    runs = interleave({k: arm(v) for k, v in batches.items()}, reps)  # warm-up round: every mode loaded once
    tok_s = {k: [x["tok_s"] for x in v] for k, v in runs.items()}
    tok_cpu = {k: [x["tok_per_cpu_s"] for x in v] for k, v in runs.items()}
    loaded_after_arms = plugin.call("worker_modes")

    # 256 in the store, each used once: 4 batches of 64 distinct modes, 1 token each
    for start in range(0, n_store, batch):
        plugin.call("run", batch=batch, max_tokens=1, caps=[[names[(start + i) % n_store]] for i in range(batch)],
                    style="raw")
    used = names[-1]  # among the most recently used: still loaded
    state_many = plugin.call("worker_modes")
    one_caps = [[used]] * batch

    def in_state(key):
        def f(i):
            plugin.call("use_worker_modes", key=key)
            return plugin.call("run", batch=batch, max_tokens=tokens if i >= 0 else 1, caps=one_caps, style="raw")
        return f

    loaded_runs = interleave({"many_loaded": in_state(NAME), "one_loaded": in_state(f"{NAME}-one")}, reps)
    loaded = {k: [x["tok_s"] for x in v] for k, v in loaded_runs.items()}
    loaded_cpu = {k: [x["tok_per_cpu_s"] for x in v] for k, v in loaded_runs.items()}
    state_one = plugin.call("use_worker_modes", key=f"{NAME}-one")
    state_many_after = plugin.call("use_worker_modes", key=NAME)
    for n in names:
        plugin.call("remove_mode", name=n)
    plugin.call("use_worker_modes", key="default")

    rows, heads = {}, []
    for k in ks:
        r, r_cpu = ratios(tok_s[f"distinct_{k}"], tok_s["one_mode"]), ratios(tok_cpu[f"distinct_{k}"], tok_cpu["one_mode"])
        rows[f"distinct_{k}_over_one_mode"] = r
        rows[f"distinct_{k}_over_one_mode_cpu"] = r_cpu
        g = GOALS["distinct_32"] if k == 32 else None
        heads.append(headline(f"{k} distinct modes / one mode, batch {batch}", r, g, cpu=r_cpu))
    r_loaded = ratios(loaded["many_loaded"], loaded["one_loaded"])
    r_loaded_cpu = ratios(loaded_cpu["many_loaded"], loaded_cpu["one_loaded"])
    heads.append(headline(f"{n_store} modes in the store, used once each (worker keeps {state_many['loaded']}) "
                          f"but one used / one loaded, batch {batch}", r_loaded, GOALS["loaded"], cpu=r_loaded_cpu))
    r_comp = ratios(tok_s["composition_4"], tok_s["one_mode"])
    r_comp_cpu = ratios(tok_cpu["composition_4"], tok_cpu["one_mode"])
    heads.append(headline(f"a composition of 4 modes (rank 192) / one mode, batch {batch}", r_comp, GOALS["composition"],
                          cpu=r_comp_cpu))
    vs_none = {k: ratios(v, tok_s["none"]) for k, v in tok_s.items() if k != "none"}
    vs_none_cpu = {k: ratios(v, tok_cpu["none"]) for k, v in tok_cpu.items() if k != "none"}
    heads.append(headline(f"one mode / no mode, batch {batch}", vs_none["one_mode"], None, cpu=vs_none_cpu["one_mode"]))
    curve = {"1": vs_none["one_mode"], **{str(k): vs_none[f"distinct_{k}"] for k in ks}}
    curve_cpu = {"1": vs_none_cpu["one_mode"], **{str(k): vs_none_cpu[f"distinct_{k}"] for k in ks}}
    base = EASYSTEER["tok_s"]["0"]
    return {
        "settings": {"batch": batch, "max_tokens": tokens, "reps": reps, "ignore_eos": True, "greedy": True,
                     "prompts": "bare GSM8K questions (no shared prefix block), prefix cache reset before every arm",
                     "modes": {"in_store": n_store, "rank": rank, "layers": layers, "kinds": ["k", "v"],
                               "basis": "random (cost only)", "assignment": "request i -> mode i mod k"},
                     "worker_max_modes": state_many["max_modes"], "add_modes_seconds": added["seconds"],
                     "engine": plugin.state},
        "tok_s": tok_s,
        "tok_per_cpu_s": tok_cpu,
        "ratios": rows,
        "over_no_mode": vs_none,
        "over_no_mode_cpu": vs_none_cpu,
        "loaded": {"tok_s": loaded, "tok_per_cpu_s": loaded_cpu, "ratio": r_loaded, "ratio_cpu": r_loaded_cpu,
                   "used_mode": used,
                   "worker_after_k_arms": loaded_after_arms, "worker_many": state_many, "worker_one": state_one,
                   "worker_many_after": state_many_after},
        "composition_4_over_one_mode": r_comp,
        "composition_4_over_one_mode_cpu": r_comp_cpu,
        "curve_over_no_mode": curve,
        "curve_over_no_mode_cpu": curve_cpu,
        "easysteer": {**EASYSTEER, "over_no_steering": {k: v / base for k, v in EASYSTEER["tok_s"].items() if k != "0"}},
        "headline": heads,
    }
