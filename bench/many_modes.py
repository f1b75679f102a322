"""11. Many modes on the plugin engine: a batch of 64 requests over 8, 32 or 64 distinct modes (request
i in mode i mod k) / the same batch in one mode; 256 modes used, one used now / only that one
loaded; a composition of 4 modes / one mode; and the curve beside EasySteer's. Every mode a random
rank-d/2 pack at the paper's layers; bare GSM8K questions, so the per-mode prefix-cache salts cannot
favour the one-mode batch.

The worker keeps at most 64 modes (least recently used evicted), so "256 loaded" is 256 packs each
used once, after which the bank holds 64 slots while the batch uses one; its baseline is the same
engine with a worker mode set that loaded only that mode (`use_worker_modes`: same process, KV cache
and scheduler). Four random rank-96 bases span all 192 dimensions: a composition of 4 costs a
rank-192 projection. EasySteer's published numbers (GPU, batch 256) stand beside ours, each curve
relative to its own no-steering throughput: their shapes compare, not their numbers.
"""
from __future__ import annotations

from common import Context, Goal, by_key, headline, interleave, run_ratios

TITLE = "vLLM: 1-64 distinct modes in a batch of 64 / one mode; 256 loaded, one used / one loaded; 4 composed / one"
GOALS = {"distinct_32": Goal(">=", 0.95), "loaded": Goal(">=", 0.98), "composition": Goal(">=", 0.95)}
USES = {"plugin_engine"}
EASYSTEER = {"source": "EasySteer, efficiency README (github.com/ZJU-REAL/EasySteer)",
             "setting": "batch of 256 on a GPU, throughput in tokens/s",
             "tok_s": {"0": 30633, "1": 23211, "8": 19923, "32": 15851, "256": 5620}}


def run(ctx: Context) -> dict:
    plugin = ctx.resources.get("plugin_engine")
    width, n_layers = plugin.state["kv_width"], plugin.state["n_layers"]
    layers, rank = sorted({n_layers // 2, n_layers - 1}), width // 2
    batch, ks, n_store = ctx.size(8, 64), ctx.size([8], [8, 32, 64]), ctx.size(16, 256)
    tokens, reps = ctx.size(4, 16), ctx.size(1, 5)
    names = [f"mm-{i:03d}" for i in range(n_store)]
    plugin.call("use_worker_modes", key=__name__)  # a worker mode set of its own: no other benchmark's modes
    added = plugin.call("add_modes", names=names, rank=rank, layers=layers, kinds=["k", "v"])

    def arm(caps):
        return lambda i: plugin.call("run", batch=batch, max_tokens=tokens if i >= 0 else 1, caps=caps, style="raw")

    batches = {"none": [[] for _ in range(batch)], "one_mode": [[names[0]]] * batch,
               **{f"distinct_{k}": [[names[i % k]] for i in range(batch)] for k in ks}, "composition_4": [names[:4]] * batch}
    runs = interleave({k: arm(v) for k, v in batches.items()}, reps)  # the warm-up round loads every mode once
    loaded_after_arms = plugin.call("worker_modes")
    for start in range(0, n_store, batch):  # every mode of the store used once, 1 token each
        plugin.call("run", batch=batch, max_tokens=1, caps=[[names[(start + i) % n_store]] for i in range(batch)],
                    style="raw")
    used = names[-1]  # among the most recently used: still loaded
    state_many = plugin.call("worker_modes")

    def in_state(key):
        def f(i):
            plugin.call("use_worker_modes", key=key)
            return plugin.call("run", batch=batch, max_tokens=tokens if i >= 0 else 1, caps=[[used]] * batch, style="raw")
        return f

    loaded_runs = interleave({"many_loaded": in_state(__name__), "one_loaded": in_state(f"{__name__}-one")}, reps)
    state_one = plugin.call("use_worker_modes", key=f"{__name__}-one")
    state_many_after = plugin.call("use_worker_modes", key=__name__)
    plugin.call("remove_modes", names=names)
    plugin.call("use_worker_modes", key="default")

    rows, heads = {}, []
    for k in ks:
        r, r_cpu = run_ratios(runs[f"distinct_{k}"], runs["one_mode"])
        rows[f"distinct_{k}_over_one_mode"], rows[f"distinct_{k}_over_one_mode_cpu"] = r, r_cpu
        heads.append(headline(f"{k} distinct modes / one mode, batch {batch}", r, GOALS["distinct_32"] if k == 32 else None,
                              cpu=r_cpu))
    r_loaded, r_loaded_cpu = run_ratios(loaded_runs["many_loaded"], loaded_runs["one_loaded"])
    heads.append(headline(f"{n_store} modes in the store, used once each (worker keeps {state_many['loaded']}) "
                          f"but one used / one loaded, batch {batch}", r_loaded, GOALS["loaded"], cpu=r_loaded_cpu))
    r_comp, r_comp_cpu = run_ratios(runs["composition_4"], runs["one_mode"])
    heads.append(headline(f"a composition of 4 modes (rank 192) / one mode, batch {batch}", r_comp, GOALS["composition"],
                          cpu=r_comp_cpu))
    vs = {k: run_ratios(v, runs["none"]) for k, v in runs.items() if k != "none"}
    vs_none, vs_none_cpu = {k: v[0] for k, v in vs.items()}, {k: v[1] for k, v in vs.items()}
    heads.append(headline(f"one mode / no mode, batch {batch}", vs_none["one_mode"], None, cpu=vs_none_cpu["one_mode"]))
    base = EASYSTEER["tok_s"]["0"]
    return {
        "settings": {"batch": batch, "max_tokens": tokens, "reps": reps, "ignore_eos": True, "greedy": True,
                     "prompts": "bare GSM8K questions (no shared prefix block), prefix cache reset before every arm",
                     "modes": {"in_store": n_store, "rank": rank, "layers": layers, "kinds": ["k", "v"],
                               "basis": "random (cost only)", "assignment": "request i -> mode i mod k"},
                     "worker_max_modes": state_many["max_modes"], "add_modes_seconds": added["seconds"],
                     "engine": plugin.state},
        "tok_s": by_key(runs, "tok_s"), "tok_per_cpu_s": by_key(runs, "tok_per_cpu_s"), "ratios": rows,
        "over_no_mode": vs_none, "over_no_mode_cpu": vs_none_cpu,
        "loaded": {"tok_s": by_key(loaded_runs, "tok_s"), "tok_per_cpu_s": by_key(loaded_runs, "tok_per_cpu_s"),
                   "ratio": r_loaded, "ratio_cpu": r_loaded_cpu, "used_mode": used,
                   "worker_after_k_arms": loaded_after_arms, "worker_many": state_many, "worker_one": state_one,
                   "worker_many_after": state_many_after},
        "composition_4_over_one_mode": r_comp, "composition_4_over_one_mode_cpu": r_comp_cpu,
        "curve_over_no_mode": {"1": vs_none["one_mode"], **{str(k): vs_none[f"distinct_{k}"] for k in ks}},
        "curve_over_no_mode_cpu": {"1": vs_none_cpu["one_mode"], **{str(k): vs_none_cpu[f"distinct_{k}"] for k in ks}},
        "easysteer": {**EASYSTEER, "over_no_steering": {k: v / base for k, v in EASYSTEER["tok_s"].items() if k != "0"}},
        "headline": heads,
    }
