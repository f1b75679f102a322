"""5. Calibration: seconds per example / a plain forward+backward with parameter gradients of the
same batches (interleaved, in this process); and peak memory as the set grows 10x, one fresh
subprocess per size. The Gram route keeps a (w x w) float64 matrix per site, never the gradient
rows, so the peak should not grow with the set. Every batch of the memory runs is the same batch of
the shortest GSM8K examples: one batch's activation peak grows with its longest sequence, and a
larger set of distinct examples holds longer ones (4 vs 40 distinct examples, 216 vs 401 tokens at
most, measured a 1.42x peak). The peak is the RSS high-water mark over the calibration alone
(VmHWM, reset through /proc/self/clear_refs once the model is loaded); ru_maxrss, which includes
loading, is reported too."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import BENCH, MODEL, REPO, Context, Goal, headline, interleave, ratios, spread

TITLE = "calibration: seconds/example vs a plain forward+backward; peak memory as the set grows 10x"
GOAL = Goal("<=", 1.3)
MEMORY_GOAL = Goal("<=", 1.1)  # "flat": peak RSS at 10x the examples within 10%
TAG = "@@bench "


def _status(key: str) -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None


def child(n: int, batch_size: int) -> None:
    """One calibration of `n` examples in this fresh process; prints its memory figures."""
    from spd_engine import models
    from spd_engine.calibrate import CalibrationConfig, calibrate
    from spd_engine.data import load_examples, resolve_data
    from spd_engine.formatting import calibration_ids

    path = models.resolve(MODEL)
    model, tok = models.load(path, "cpu")
    length = lambda ex: len(calibration_ids(tok, "math", ex)[0])  # noqa: E731
    base = sorted(load_examples(resolve_data("gsm8k"), "math"), key=length)[:batch_size]
    rss_loaded, reset = _status("VmRSS"), True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        reset = False
    t0 = time.perf_counter()
    pack = calibrate(model, tok, models.info(path), "math", [base[i % len(base)] for i in range(n)], "mem",
                     CalibrationConfig(batch_size=batch_size))  # identical batches: only their number grows
    peak = _status("VmHWM") if reset else None
    print(TAG + json.dumps({
        "examples": n, "batch_size": batch_size, "longest_tokens": max(map(length, base)),
        "seconds": time.perf_counter() - t0, "rows": pack.manifest.calibration.n_rows, "rss_after_load_bytes": rss_loaded,
        "peak_rss_calibration_bytes": peak, "hwm_reset": reset,
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_above_loaded_bytes": peak - rss_loaded if reset else None}), flush=True)


def _child_run(n: int, batch_size: int) -> dict:
    proc = subprocess.run([sys.executable, str(BENCH / "calibration.py"), "--child", str(n), str(batch_size)],
                          capture_output=True, text=True, cwd=str(REPO))
    for line in proc.stdout.splitlines():
        if line.startswith(TAG):
            return json.loads(line[len(TAG):])
    raise RuntimeError(f"calibration child ({n} examples) failed: {proc.stderr[-2000:]}")


def run(ctx: Context) -> dict:
    from spd_engine.calibrate import CalibrationConfig, batches, calibrate
    from spd_engine.data import load_examples, resolve_data
    from spd_engine.hf_backend import HFBackend

    be = HFBackend(MODEL)
    model, tok = be.model, be.tokenizer
    gsm = load_examples(resolve_data("gsm8k"), "math")
    n, bs, reps = ctx.size(2, 4), ctx.size(2, 4), ctx.size(1, 3)

    def chunk(i):
        return gsm[max(i, 0) * n: max(i, 0) * n + n]

    def calib(i):
        t0 = time.perf_counter()
        calibrate(model, tok, be.model_info, "math", chunk(i), "bench", CalibrationConfig(batch_size=bs))
        return (time.perf_counter() - t0) / n

    def forward_backward(i):
        for p in model.parameters():
            p.requires_grad_(True)  # calibration turns them off
        t0 = time.perf_counter()
        for ids, mask, _ in batches(tok, "math", chunk(i), bs):
            model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        dt = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(False)
        return dt / n

    sec = interleave({"calibration": calib, "forward_backward": forward_backward}, reps)
    r = ratios(sec["calibration"], sec["forward_backward"])
    be = model = None  # freed before the memory runs

    sizes, mem_bs = ctx.size([1, 10], [4, 40]), ctx.size(1, 4)
    mem = [_child_run(s, mem_bs) for s in sizes]
    key = "peak_rss_calibration_bytes" if all(m["hwm_reset"] for m in mem) else "ru_maxrss_bytes"
    growth = spread([mem[-1][key] / mem[0][key]])
    return {
        "settings": {"examples_per_rep": n, "batch_size": bs, "reps": reps, "data": "gsm8k (distinct examples per rep)",
                     "calibration": "gradient method, default layers (15, 29), K and V, rank d/2",
                     "baseline": "model(input_ids, labels=ids).loss.backward() with every parameter requiring grad",
                     "memory_sizes": sizes, "memory_batch_size": mem_bs, "memory_measure": key,
                     "memory_examples": "one batch of the shortest GSM8K examples, repeated (identical batches)"},
        "seconds_per_example": sec,
        "calibration_over_forward_backward": r,
        "memory": mem,
        "memory_growth": {"examples_ratio": sizes[-1] / sizes[0], "peak_ratio": growth["median"], "measure": key},
        "headline": [headline(f"calibration / forward+backward (s per example, batch {bs})", r, GOAL),
                     headline(f"peak RSS at {sizes[-1]} / {sizes[0]} examples", growth, MEMORY_GOAL)],
    }


if __name__ == "__main__":  # the memory runs' fresh process
    child(int(sys.argv[2]), int(sys.argv[3]))
