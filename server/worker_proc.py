"""The job worker's subprocess: calibration and LoRA training run here, outside the serving
process, so they never block requests. It reads one JSON step spec, prints JSON progress lines
({"progress": [done, total]}) and ends with {"result": {...}}; it dies with its parent."""
from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from pathlib import Path


def die_with_parent() -> None:
    """preexec_fn: SIGKILL this process when the server process dies (Linux prctl)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def calibrate(spec: dict) -> dict:
    from spd_engine import models
    from spd_engine.calibrate import CalibrationConfig, calibrate as run
    from spd_engine.data import data_sha256, load_examples
    from spd_engine.subspace import Store

    source = spec["data"]
    examples = load_examples(source, spec["task"], limit=spec.get("limit"))
    path = models.resolve(spec["model"])
    model, tok = models.load(path)
    cfg = CalibrationConfig.model_validate(spec["cfg"])  # the job's settings, as the server validated them
    total, done = len(examples), 0
    emit({"progress": [0, total]})

    def progress(n: int) -> None:
        nonlocal done
        done += n
        emit({"progress": [done, total]})

    pack = run(model, tok, models.info(path), spec["task"], examples, spec["name"], cfg,
               data=spec.get("data_label", str(source)), data_sha256=data_sha256(source), progress=progress)
    store = Store(Path(spec["store"]))
    if spec["name"] in store.names():
        raise ValueError(f"a subspace named {spec['name']!r} already exists")
    store.save(pack)
    return calibration_result(pack.manifest)


def calibration_result(m) -> dict:
    """A calibrate job's result, from the manifest of the pack it wrote."""
    return {"subspace": m.name, "ranks": m.ranks, "rank_rule": m.rank_rule, "seconds": m.calibration.seconds,
            "n_examples": m.calibration.n_examples}


def distill(spec: dict) -> dict:
    from spd_engine import models
    from spd_engine.corpus import read_corpus
    from spd_engine.distill import DistillConfig, distill as run

    rows = read_corpus(Path(spec["corpus"]))
    if not rows:
        raise ValueError("the corpus is empty")
    cfg = DistillConfig.model_validate(spec["cfg"])  # the job's settings, as the server validated them
    model, tok = models.load(models.resolve(spec["model"]))

    def progress(step: int, total: int, loss: float) -> None:
        emit({"progress": [step, total], "loss": loss})

    return distill_result(run(model, tok, rows, Path(spec["out"]), cfg, progress))


def distill_result(report: dict) -> dict:
    """A distill step's result, from the training report saved beside its adapter."""
    return {k: v for k, v in report.items() if k != "config"}


def main(argv: list[str]) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec = json.loads(Path(argv[0]).read_text())
    try:
        result = {"calibrate": calibrate, "distill": distill}[spec["step"]](spec)
    except Exception as e:  # noqa: BLE001 - reported to the worker as the job's error
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        emit({"error": f"{type(e).__name__}: {msg}"})
        return 1
    emit({"result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
