"""5. Calibration: seconds per example / a plain forward+backward with parameter gradients of the
same batches; and peak memory as the set grows 10x, one fresh process per size. The Gram route keeps
a (w x w) float64 matrix per site, never the gradient rows, so the peak should not grow with the
set. The memory runs repeat one batch of the shortest GSM8K examples: a batch's activation peak grows
with its longest sequence (4 vs 40 distinct examples: 216 vs 401 tokens, a 1.42x peak). The peak is
VmHWM over the calibration alone (reset once the model is loaded); ru_maxrss includes loading."""

import multiprocessing
import resource
import time
from pathlib import Path

from common import MODEL, Context, Goal, headline, interleave, ratios, spread

TITLE = "calibration: seconds/example vs a plain forward+backward; peak memory as the set grows 10x"
GOAL = Goal("<=", 1.3)
MEMORY_GOAL = Goal("<=", 1.1)  # "flat": peak RSS at 10x the examples within 10%


def status(key: str) -> int:
    return next(int(ln.split()[1]) * 1024 for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(key))


def memory(n: int, batch_size: int) -> dict:
    """One calibration of `n` examples in a fresh process: its memory figures."""
    from spd_engine import models
    from spd_engine.calibrate import CalibrationConfig, calibrate
    from spd_engine.data import load_examples, resolve_data
    from spd_engine.formatting import calibration_ids

    path = models.resolve(MODEL)
    model, tok = models.load(path, "cpu")
    length = lambda ex: len(calibration_ids(tok, "math", ex)[0])  # noqa: E731
    base = sorted(load_examples(resolve_data("gsm8k"), "math"), key=length)[:batch_size]
    rss_loaded, reset = status("VmRSS"), True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        reset = False
    t0 = time.perf_counter()
    pack = calibrate(model, tok, models.info(path), "math", [base[i % len(base)] for i in range(n)], "mem",
                     CalibrationConfig(batch_size=batch_size))  # identical batches: only their number grows
    peak = status("VmHWM") if reset else None
    return {"examples": n, "batch_size": batch_size, "longest_tokens": max(map(length, base)),
            "seconds": time.perf_counter() - t0, "rows": pack.manifest.calibration.n_rows, "rss_after_load_bytes": rss_loaded,
            "peak_rss_calibration_bytes": peak, "hwm_reset": reset,
            "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_above_loaded_bytes": peak - rss_loaded if reset else None}


def run(ctx: Context) -> dict:
    from spd_engine.calibrate import CalibrationConfig, batches, calibrate
    from spd_engine.data import load_examples, resolve_data
    from spd_engine.hf_backend import HFBackend

    be = HFBackend(MODEL)
    model, tok = be.model, be.tokenizer
    gsm = load_examples(resolve_data("gsm8k"), "math")
    n, bs, reps = ctx.size(2, 4), ctx.size(2, 4), ctx.size(1, 3)
    chunk = lambda i: gsm[max(i, 0) * n: max(i, 0) * n + n]  # noqa: E731

    def calib(i):
        t0 = time.perf_counter()
        calibrate(model, tok, be.model_info, "math", chunk(i), "bench", CalibrationConfig(batch_size=bs))
        return (time.perf_counter() - t0) / n

    def forward_backward(i):
        model.requires_grad_(True)  # calibration turns them off
        t0 = time.perf_counter()
        for ids, mask, _ in batches(tok, "math", chunk(i), bs):
            model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        dt = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)
        return dt / n

    sec = interleave({"calibration": calib, "forward_backward": forward_backward}, reps)
    r = ratios(sec["calibration"], sec["forward_backward"])
    be = model = None  # freed before the memory runs

    sizes, mem_bs = ctx.size([1, 10], [4, 40]), ctx.size(1, 4)
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:  # a fresh process each
        mem = [pool.apply(memory, (s, mem_bs)) for s in sizes]
    key = "peak_rss_calibration_bytes" if all(m["hwm_reset"] for m in mem) else "ru_maxrss_bytes"
    growth = spread([mem[-1][key] / mem[0][key]])
    return {
        "settings": {"examples_per_rep": n, "batch_size": bs, "reps": reps, "calibration": "gradient, default layers, rank d/2",
                     "memory_sizes": sizes, "memory_batch_size": mem_bs, "memory_measure": key},
        "seconds_per_example": sec, "calibration_over_forward_backward": r, "memory": mem,
        "memory_growth": {"examples_ratio": sizes[-1] / sizes[0], "peak_ratio": growth["median"], "measure": key},
        "headline": [headline(f"calibration / forward+backward (s per example, batch {bs})", r, GOAL),
                     headline(f"peak RSS at {sizes[-1]} / {sizes[0]} examples", growth, MEMORY_GOAL)],
    }
