"""18. vLLM-CPU's LoRA logits op (`add_lora_logits`: bgmv_shrink then bgmv_expand over the bundled
model's vocabulary, rank 16, both adapter slots filled) when no token of the call has an adapter,
as an `--enable-lora` server runs it for every request without one: the plugin's op (fix 1 with its
one-row shortcut) / the same fix computing every row. Seconds per call, interleaved, in-process."""
import inspect
import json
import time

import torch

from common import MODEL, Context, headline, ratios, spread

TITLE = "LoRA logits op without an adapter in the call: the one-row shortcut / every row"
RANK, SLOTS = 16, 2


def run(ctx: Context) -> dict:
    import vllm.lora.ops.torch_ops.lora_ops as ops

    from server.vllm_lora_fixes import _masked
    from spd_engine import models

    cfg = json.loads((models.resolve(MODEL) / "config.json").read_text())
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    stock = {n: inspect.unwrap(getattr(ops, n)) for n in ("bgmv_shrink", "bgmv_expand")}  # unpatched
    fixed = {n: _masked(op) for n, op in stock.items()}

    def every_row(x, a, buf, b, y, idx):  # fix 1 without the shortcut: zeroed rows, clamped indices
        stock["bgmv_shrink"](x * 0, a, buf, idx.clamp(min=0), 1.0)
        stock["bgmv_expand"](buf, b, y, idx.clamp(min=0), True)

    def shortcut(x, a, buf, b, y, idx):
        fixed["bgmv_shrink"](x, a, buf, idx, 1.0)
        fixed["bgmv_expand"](buf, b, y, idx, True)

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(SLOTS, 1, RANK, hidden, generator=gen), torch.randn(SLOTS, 1, vocab, RANK, generator=gen)
    tokens, reps = ctx.size([64], [1, 64, 256]), ctx.size(1, 5)
    results, heads = {}, []
    for t in tokens:
        x, idx = torch.randn(t, hidden, generator=gen), torch.full((t,), -1)
        arms = {"every_row": every_row, "shortcut": shortcut}
        seconds = {k: [] for k in arms}
        outs = {}
        for _ in range(reps + 1):  # the first round warms up
            for k, f in arms.items():
                y, buf = torch.zeros(t, vocab), torch.zeros(t, RANK)
                t0 = time.perf_counter()
                f(x, a, buf, b, y, idx)
                seconds[k].append(time.perf_counter() - t0)
                outs[k] = y
        assert torch.equal(outs["shortcut"], outs["every_row"])  # the same logits delta (zero)
        seconds = {k: v[1:] for k, v in seconds.items()}
        r = ratios(seconds["shortcut"], seconds["every_row"])
        results[str(t)] = {"seconds": {k: spread(v) for k, v in seconds.items()}, "shortcut_over_every_row": r}
        heads.append(headline(f"LoRA logits op, no adapter, {t} tokens: shortcut / every row (seconds)", r, None))
    return {"settings": {"tokens": tokens, "reps": reps, "rank": RANK, "adapter_slots": SLOTS, "hidden": hidden,
                         "vocab": vocab, "dtype": "float32"},
            "results": results, "headline": heads}
