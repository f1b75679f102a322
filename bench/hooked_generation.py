"""4. transformers backend: generation tokens/s with every row in one mode (rank d/2 at the paper's
layers, K and V) / without, interleaved, in this process."""

from common import MODEL, Context, Goal, described, headline, hf_tok_s, interleave, random_pack, ratios

TITLE = "transformers backend: hooked / unhooked generation tokens/s"
GOAL = Goal(">=", 0.95)


def run(ctx: Context) -> dict:
    import torch

    from spd_engine.data import load_examples, resolve_data
    from spd_engine.formatting import prompt_ids
    from spd_engine.hf_backend import HFBackend

    batch, tokens, reps = ctx.size(2, 8), ctx.size(8, 32), ctx.size(1, 3)
    be = HFBackend(MODEL, batch_size=batch)
    be.add_subspace(pack := random_pack(be.model_info, "hg-half"))
    prompts = [prompt_ids(be.tokenizer, "math", ex) for ex in load_examples(resolve_data("gsm8k"), "math")[20:20 + batch]]
    tok_s = interleave({"unhooked": lambda i: hf_tok_s(be, prompts, (), tokens),
                        "hooked": lambda i: hf_tok_s(be, prompts, ("hg-half",), tokens)}, reps)
    r = ratios(tok_s["hooked"], tok_s["unhooked"])
    return {"settings": {"backend": "hf (transformers generate)", "batch": batch, "max_tokens": tokens, "reps": reps,
                         "ignore_eos": True, "greedy": True, "torch_threads": torch.get_num_threads(), "mode": described(pack)},
            "tok_s": tok_s, "hooked_over_unhooked": r, "headline": [headline(f"hooked / unhooked, batch {batch}", r, GOAL)]}
