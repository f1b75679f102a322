"""Benchmark: transformers backend, generation tokens/s with every row in one mode / without,
interleaved (A B A B ...) in one run, plus calibration seconds per example / a plain
forward+backward of the same batch. Writes bench/results/hooked_generation.json.

    python bench/hooked_generation.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spd_engine import __version__  # noqa: E402
from spd_engine.atomic import write_json  # noqa: E402
from spd_engine.backend import GenerationRequest  # noqa: E402
from spd_engine.calibrate import CalibrationConfig, batches, calibrate  # noqa: E402
from spd_engine.data import load_examples, resolve_data  # noqa: E402
from spd_engine.formatting import prompt_ids  # noqa: E402
from spd_engine.hf_backend import HFBackend  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "spd": __version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    reps = 2 if args.quick else 5
    be = HFBackend("smollm2-135m", batch_size=args.batch)
    gsm = load_examples(resolve_data("gsm8k"), "math")
    calib = gsm[:8]

    # calibration cost vs a plain forward+backward (parameter gradients) of the same batches
    t0 = time.perf_counter()
    pack = calibrate(be.model, be.tokenizer, be.model_info, "math", calib, "bench-math", CalibrationConfig(batch_size=4))
    t_cal = time.perf_counter() - t0
    for p in be.model.parameters():
        p.requires_grad_(True)
    t0 = time.perf_counter()
    for ids, mask, _ in batches(be.tokenizer, "math", calib, 4):
        be.model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    t_fb = time.perf_counter() - t0
    be.model.zero_grad(set_to_none=True)
    for p in be.model.parameters():
        p.requires_grad_(False)
    be.add_subspace(pack)

    prompts = [prompt_ids(be.tokenizer, "math", ex) for ex in gsm[20 : 20 + args.batch]]

    def run(cap: tuple[str, ...]) -> float:
        # ignore EOS so every row produces exactly `tokens` tokens: equal work in both arms
        reqs = [GenerationRequest(p, capability=cap, max_tokens=args.tokens, ignore_eos=True) for p in prompts]
        t = time.perf_counter()
        outs = be.generate(reqs)
        return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)

    run(())  # warm-up
    plain, hooked = [], []
    for _ in range(reps):
        plain.append(run(()))
        hooked.append(run(("bench-math",)))
    ratios = [h / p for h, p in zip(hooked, plain)]
    result = {
        "benchmark": "transformers hooked/unhooked generation + calibration cost",
        "machine": machine(), "model": "smollm2-135m", "dtype": "float32",
        "settings": {"batch": args.batch, "max_tokens": args.tokens, "reps": reps, "layers": pack.manifest.layers,
                     "kinds": pack.manifest.kinds, "rank": pack.manifest.ranks},
        "generation": {"plain_tok_s": plain, "hooked_tok_s": hooked, "ratio_median": statistics.median(ratios),
                       "ratio_min": min(ratios), "ratio_max": max(ratios), "goal": ">= 0.95"},
        "calibration": {"examples": len(calib), "seconds": t_cal, "seconds_per_example": t_cal / len(calib),
                        "plain_forward_backward_seconds": t_fb, "ratio": t_cal / t_fb, "goal": "<= 1.3"},
    }
    write_json(RESULTS / "hooked_generation.json", result)
    print(json.dumps({"generation": result["generation"], "calibration": result["calibration"]}, indent=2))


if __name__ == "__main__":
    main()
