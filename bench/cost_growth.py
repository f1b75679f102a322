"""3. Cost growth: the projection's overhead against its rank (d/8 .. d, 2 layers) and against the
number of projected layers (2, 8, all; rank d/2), each beside the FLOP-count prediction.

Baseline: the same plugin engine's requests without a mode (nothing is projected then), run right
before each mode arm; measured per wall-clock second and per CPU-second of the engine process. Each variant is a pack saved into the plugin engine's store; the worker loads
it at its first request. Each variant is measured with a worker mode set of its own (deleting a
pack from the store does not unload it from the worker, and a mode loaded at other layers would
add a call per layer it covers), so only the measured mode is loaded while it is measured.

The prediction, from `spd_engine/projection.py` `SiteBank.apply`, per token and projected site
(width w = n_kv_heads x head_dim, r = the rank of the token's own mode at that site):
    x @ U        (1 x w)(w x r)   2wr
    @ U.T        (1 x r)(r x w)   2wr
    x + a(px-x)  (1 x w) x 3      3w
so 4wr + 3w FLOPs per site, against about 2 x params FLOPs per token for the model itself
(every weight is one multiply-add; attention over the context is left out, which makes the
predicted overhead an upper bound). Predicted ratio = 1 / (1 + projection / model). Not in the
count: the per-step routing on the host (token -> request -> slot, grouping rows by slot), a
fixed cost per step that weighs most at small batches.
"""
from __future__ import annotations

from common import Context, headline, interleave, model_params, ratios

NAME = "cost_growth"
TITLE = "vLLM: overhead vs rank and vs number of projected layers, beside the FLOP prediction"
GOAL = None  # the goal: measured growth follows the prediction (reported, not thresholded)
USES = {"plugin_engine"}


def site_flops(width: int, rank: int) -> int:
    return 4 * width * rank + 3 * width


def variants(width: int, n_layers: int) -> list[dict]:
    two = sorted({n_layers // 2, n_layers - 1})
    eight = sorted({round(i * (n_layers - 1) / 7) for i in range(8)})
    everything = list(range(n_layers))
    out = [{"sweep": "rank", "label": f"rank d/{width // r}" if r < width else "rank d", "rank": r, "layers": two}
           for r in (width // 8, width // 4, width // 2, width)]
    out += [{"sweep": "layers", "label": f"{len(ls)} layers", "rank": width // 2, "layers": ls} for ls in (eight, everything)]
    out.append({"sweep": "layers", "label": f"{n_layers} layers, rank d", "rank": width, "layers": everything})
    return out


def run(ctx: Context) -> dict:
    plugin = ctx.resources.get("plugin_engine")
    width, n_layers = plugin.state["kv_width"], plugin.state["n_layers"]
    params = model_params(plugin.state["model_dir"])
    model_flops = 2 * params
    batch, tokens, reps = ctx.size(2, 4), ctx.size(4, 16), ctx.size(1, 5)
    plugin.call("run", batch=2, max_tokens=2)  # warm-up
    rows, heads = [], []
    for v in variants(width, n_layers):
        name = f"cg-r{v['rank']}-l{len(v['layers'])}"
        plugin.call("use_worker_modes", key=name)  # a worker mode set of its own: only this variant loaded
        plugin.call("add_mode", name=name, rank=v["rank"], layers=v["layers"], kinds=["k", "v"])
        sites = 2 * len(v["layers"])
        proj = sites * site_flops(width, v["rank"])
        predicted_ratio = 1 / (1 + proj / model_flops)

        def arm(caps):
            return lambda i: plugin.call("run", batch=batch, max_tokens=tokens, caps=caps)

        plugin.call("run", batch=batch, max_tokens=2, caps=[[name]] * batch)  # the new bank's first step
        runs = interleave({"no_mode": arm([[]] * batch), "mode": arm([[name]] * batch)}, reps, warmup=False)
        plugin.call("remove_mode", name=name)
        plugin.call("use_worker_modes", key="default")
        tok_s = {k: [x["tok_s"] for x in v] for k, v in runs.items()}
        tok_cpu = {k: [x["tok_per_cpu_s"] for x in v] for k, v in runs.items()}
        r, r_cpu = ratios(tok_s["mode"], tok_s["no_mode"]), ratios(tok_cpu["mode"], tok_cpu["no_mode"])
        row = {**v, "sites": sites, "projection_flops_per_token": proj, "model_flops_per_token": model_flops,
               "predicted_overhead": proj / model_flops, "predicted_ratio": predicted_ratio,
               "measured_ratio": r, "measured_overhead": 1 - r["median"], "measured_ratio_cpu": r_cpu,
               "tok_s": tok_s, "tok_per_cpu_s": tok_cpu}
        rows.append(row)
        heads.append({**headline(f"{v['label']} ({len(v['layers'])} layers, rank {v['rank']}): mode / no mode", r, None,
                                 cpu=r_cpu), "predicted": predicted_ratio})
        print(f"  cost_growth {v['label']:>22}: measured ratio {r['median']:.4f} [{r['min']:.4f}, {r['max']:.4f}]"
              f"  predicted by FLOPs {predicted_ratio:.4f} (overhead {100 * proj / model_flops:.3f}%)", flush=True)
    return {
        "settings": {"batch": batch, "max_tokens": tokens, "reps": reps, "ignore_eos": True, "kinds": ["k", "v"],
                     "width_d": width, "n_layers": n_layers, "model_params": params, "basis": "random (cost only)",
                     "baseline": "the same engine, requests without a mode", "flops_formula": "sites x (4wr + 3w)"},
        "rows": rows,
        "headline": heads,
    }
