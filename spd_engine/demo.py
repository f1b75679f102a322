"""The main job until the server lands: calibrate a math mode on real GSM8K data with the bundled
model, then answer the same held-out prompts with and without it, side by side."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

from .backend import GenerationRequest
from .calibrate import CalibrationConfig, calibrate
from .data import data_sha256, load_examples, resolve_data
from .formatting import prompt_ids
from .hf_backend import HFBackend
from .subspace import Store
from .tasks import score, stop_strings

MODE = "gsm8k-math"


def run_demo(model: str, store: Store, n_calibration: int = 24, n_show: int = 3) -> None:
    src = resolve_data("gsm8k")
    examples = load_examples(src, "math")
    calib, held_out = examples[:n_calibration], examples[-n_show:]
    backend = HFBackend(model)
    if MODE in store.names():
        pack = store.load(MODE, backend.model_info)
        print(f"using the stored mode {MODE!r} ({store.path(MODE)})")
    else:
        with tqdm(total=len(calib), desc=f"calibrating {MODE}", unit="ex", file=sys.stderr) as bar:
            pack = calibrate(backend.model, backend.tokenizer, backend.model_info, "math", calib, MODE,
                             CalibrationConfig(rank=16), data=str(src), data_sha256=data_sha256(src),
                             progress=bar.update)
        store.save(pack)
        print(f"calibrated {MODE!r} on {len(calib)} GSM8K items in {pack.manifest.calibration.seconds:.1f} s "
              f"-> {store.path(MODE)}")
    backend.add_subspace(pack)
    reqs = []
    for ex in held_out:
        ids = prompt_ids(backend.tokenizer, "math", ex)
        for cap in ((), (MODE,)):
            reqs.append(GenerationRequest(ids, capability=cap, max_tokens=160, stop=tuple(stop_strings("math"))))
    started = time.perf_counter()
    outs = backend.generate(reqs)  # one mixed batch: rows with and without the mode together
    print(f"generated {len(reqs)} completions in one mixed batch in {time.perf_counter() - started:.1f} s\n")
    for i, ex in enumerate(held_out):
        print("=" * 100)
        print(f"[{ex.id}] {ex.prompt}\n(gold: {ex.answer.rsplit('####', 1)[-1].strip()})")
        for label, out in (("without the mode", outs[2 * i]), (f"with {MODE!r} (strength 1)", outs[2 * i + 1])):
            print(f"--- {label}  [correct: {score('math', ex, out.text)}]\n{out.text.strip()}\n")
