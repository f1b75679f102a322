"""11. Many modes on the plugin engine, a batch of 64 requests of random rank-d/2 modes on bare GSM8K
questions (the per-mode prefix-cache salts cannot favour the one-mode batch): 8, 32 or 64 distinct
modes / one mode; 256 modes used once each, then one used / only that one loaded (the worker keeps
the 64 most recent; the baseline is the same engine with a mode set that loaded only that one); a
composition of 4 (rank 192: four random rank-96 bases span all 192 dimensions) / one mode. Beside
EasySteer's published curve (GPU, batch 256), each relative to its own no-steering throughput:
the shapes compare, not the numbers."""

from common import Context, Goal, compared, headline, interleave, per_arm, run_ratios

TITLE = "vLLM: 1-64 distinct modes in a batch of 64 / one mode; 256 loaded, one used / one loaded; 4 composed / one"
GOALS = {"distinct_32": Goal(">=", 0.95), "loaded": Goal(">=", 0.98), "composition": Goal(">=", 0.95)}
USES = {"plugin_engine"}
EASYSTEER = {"source": "EasySteer, efficiency README (github.com/ZJU-REAL/EasySteer)",
             "setting": "batch of 256 on a GPU, throughput in tokens/s",
             "tok_s": {"0": 30633, "1": 23211, "8": 19923, "32": 15851, "256": 5620}}


def run(ctx: Context) -> dict:
    plugin = ctx.resources.get("plugin_engine")
    batch, ks, n_store = ctx.size(8, 64), ctx.size([8], [8, 32, 64]), ctx.size(16, 256)
    tokens, reps = ctx.size(4, 16), ctx.size(1, 5)
    names = [f"mm-{i:03d}" for i in range(n_store)]
    added = plugin.call("add_modes", names=names, key=__name__)
    one = f"{__name__}-one"  # the worker mode set that loads only the mode used
    arm = lambda caps, key=None: plugin.arm(batch, tokens, caps, "raw", key)  # noqa: E731
    batches = {"none": [[] for _ in range(batch)], "one_mode": [[names[0]]] * batch,
               **{f"distinct_{k}": [[names[i % k]] for i in range(batch)] for k in ks}, "composition_4": [names[:4]] * batch}
    runs = interleave({k: arm(v) for k, v in batches.items()}, reps)  # the warm-up loads every mode once
    loaded_after_arms = plugin.call("worker_modes")
    for start in range(0, n_store, batch):  # every mode of the store used once, 1 token each
        arm([[names[(start + i) % n_store]] for i in range(batch)])(-1)
    used = names[-1]  # among the most recently used: still loaded
    state_many = plugin.call("worker_modes")
    loaded_runs = interleave({"many_loaded": arm([[used]] * batch, __name__), "one_loaded": arm([[used]] * batch, one)}, reps)
    state_one, state_many_after = (plugin.call("use_worker_modes", key=k) for k in (one, __name__))
    plugin.call("remove_modes", names=names)

    rows, heads = {}, []
    for k in ks:
        row, head = compared(f"distinct_{k}_over_one_mode", f"{k} distinct modes / one mode, batch {batch}",
                             runs[f"distinct_{k}"], runs["one_mode"], GOALS["distinct_32"] if k == 32 else None)
        rows, heads = {**rows, **row}, heads + [head]
    loaded, head = compared("ratio", f"{n_store} modes in the store, used once each (worker keeps {state_many['loaded']}) "
                            f"but one used / one loaded, batch {batch}", loaded_runs["many_loaded"],
                            loaded_runs["one_loaded"], GOALS["loaded"])
    comp, head_comp = compared("composition_4_over_one_mode", f"a composition of 4 modes (rank 192) / one mode, batch {batch}",
                               runs["composition_4"], runs["one_mode"], GOALS["composition"])
    vs = {k: run_ratios(v, runs["none"]) for k, v in runs.items() if k != "none"}
    vs_none, vs_none_cpu = {k: v[0] for k, v in vs.items()}, {k: v[1] for k, v in vs.items()}
    heads += [head, head_comp, headline(f"one mode / no mode, batch {batch}", vs_none["one_mode"], None,
                                        cpu=vs_none_cpu["one_mode"])]
    curve = lambda v: {"1": v["one_mode"], **{str(k): v[f"distinct_{k}"] for k in ks}}  # noqa: E731
    return {
        "settings": {"batch": batch, "max_tokens": tokens, "reps": reps, "ignore_eos": True, "greedy": True,
                     "modes": {"in_store": n_store, **added["mode"], "assignment": "request i -> mode i mod k"},
                     "worker_max_modes": state_many["max_modes"], "add_modes_seconds": added["seconds"],
                     "engine": plugin.state},
        **per_arm(runs), "ratios": rows, "over_no_mode": vs_none, "over_no_mode_cpu": vs_none_cpu,
        "loaded": {**per_arm(loaded_runs), **loaded, "used_mode": used, "worker_after_k_arms": loaded_after_arms,
                   "worker_many": state_many, "worker_one": state_one, "worker_many_after": state_many_after},
        **comp, "curve_over_no_mode": curve(vs_none), "curve_over_no_mode_cpu": curve(vs_none_cpu),
        "easysteer": {**EASYSTEER, "over_no_steering": {k: v / EASYSTEER["tok_s"]["0"] for k, v in EASYSTEER["tok_s"].items()
                                                        if k != "0"}},
        "headline": heads,
    }
