"""4. transformers backend: generation tokens/s with every row in one mode (layers 15 and 29, K
and V, rank d/2) / without, interleaved, in this process.

    python bench/hooked_generation.py [--quick]     (= python bench/run.py --only hooked_generation)
"""
from __future__ import annotations

import sys

from common import Context, Goal, headline, interleave, ratios

NAME = "hooked_generation"
TITLE = "transformers backend: hooked / unhooked generation tokens/s"
GOAL = Goal(">=", 0.95)
USES: set[str] = set()


def run(ctx: Context) -> dict:
    import time

    import torch

    from spd_engine.backend import GenerationRequest
    from spd_engine.calibrate import CalibrationConfig, calibrate, default_layers
    from spd_engine.data import load_examples, resolve_data
    from spd_engine.formatting import prompt_ids
    from spd_engine.hf_backend import HFBackend

    batch, tokens, reps = ctx.size(2, 8), ctx.size(8, 32), ctx.size(1, 3)
    be = HFBackend("smollm2-135m", batch_size=batch)
    info = be.model_info
    layers = default_layers(info.n_layers)
    # a random basis: the projection's cost does not depend on its content
    pack = calibrate(None, be.tokenizer, info, "math", [], "hg-half",
                     CalibrationConfig(rank=info.kv_width // 2, layers=layers, method="random"))
    be.add_subspace(pack)
    gsm = load_examples(resolve_data("gsm8k"), "math")
    prompts = [prompt_ids(be.tokenizer, "math", ex) for ex in gsm[20 : 20 + batch]]

    def arm(cap):
        def f(i):
            # EOS ignored: every row produces exactly `tokens` tokens, equal work in both arms
            reqs = [GenerationRequest(p, capability=cap, max_tokens=tokens, ignore_eos=True) for p in prompts]
            t = time.perf_counter()
            outs = be.generate(reqs)
            return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)
        return f

    tok_s = interleave({"unhooked": arm(()), "hooked": arm(("hg-half",))}, reps)
    r = ratios(tok_s["hooked"], tok_s["unhooked"])
    return {
        "settings": {"backend": "hf (transformers generate)", "batch": batch, "max_tokens": tokens, "reps": reps,
                     "ignore_eos": True, "greedy": True, "torch_threads": torch.get_num_threads(),
                     "mode": {"rank": info.kv_width // 2, "layers": layers, "kinds": ["k", "v"], "basis": "random (cost only)"}},
        "tok_s": tok_s,
        "hooked_over_unhooked": r,
        "headline": [headline(f"hooked / unhooked, batch {batch}", r, GOAL)],
    }


if __name__ == "__main__":
    import run as runner

    sys.exit(runner.main(["--only", NAME, *sys.argv[1:]]))
