"""The job types: what each job does, by calling spd_engine (no method code here).

calibrate and distill run in a worker subprocess (`server.worker_proc`); generate and evaluate
run through vLLM's engine client (`EngineClientBackend`), so they share the continuous batch with
live requests instead of loading a second model.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Awaitable, Protocol

from spd_engine.atomic import write_json
from spd_engine.backend import Backend
from spd_engine.config import CalibrationConfig, DistillConfig, EvaluationConfig, GenerationConfig, narrow
from spd_engine.data import DataError, data_sha256, load_examples, resolve_data
from spd_engine.models import ModelInfo
from spd_engine.subspace import Store

from .jobs import JobContext, JobStore, Worker
from .schemas import DataSpec, GenerateRecord, PipelineRecord, Source, load_record
from .settings import Settings
from .worker_proc import calibration_result, distill_result

INPUTS = "inputs"


class JobHost(Protocol):
    """What the job steps use of the server they run in (`server.state.SPDServer` is one)."""

    settings: Settings
    store: Store
    backend: Backend
    model_info: ModelInfo
    model_path: Path
    model_id: str
    max_model_len: int
    tokenizer: Any

    def add_mode(self, name: str) -> None: ...

    def load_adapter(self, name: str, path: Path) -> Awaitable[None]: ...

    def adapter_paths(self) -> dict[str, str]: ...

    def call(self, coro: Awaitable) -> Any: ...


def start_worker(host: JobHost, jobs: JobStore) -> Worker:
    """The job worker (started) of a server's job store: it runs the steps below with the server as
    their host; one running worker per data dir (the jobs lock)."""
    worker = Worker(jobs, host.settings.jobs_dir, make_runners(host, jobs), host.settings.jobs_lock)
    worker.start()
    return worker


# ---------------------------------------------------------------- inputs (validated at submission)


def prepare_data(spec: DataSpec, task: str, job_dir: Path, role: str, allow_code: bool = False) -> Source:
    """Write an inline data spec into the job dir and validate it; a DataError names `role:line`.
    Inline rows with their own unit tests are refused unless the operator allows client code
    (SPD_ALLOW_CLIENT_CODE): scoring them runs that code on the server."""
    if spec.dataset:  # exactly one source: DataSpec checked it
        source = Source(dataset=spec.dataset, limit=spec.limit)
    else:
        text = spec.data if spec.data is not None else "\n".join(json.dumps(e) for e in spec.examples or [])
        path = job_dir / INPUTS / f"{role}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        source = Source(file=f"{INPUTS}/{role}.jsonl", limit=spec.limit)
    try:
        examples = load_examples(source_path(job_dir, source), task, limit=source.limit)
    except DataError as e:
        raise DataError(str(e).replace(str(job_dir / INPUTS / f"{role}.jsonl"), role)) from None
    if not examples:
        raise DataError(f"{role}: no examples")
    if not spec.dataset and not allow_code and any(ex.tests for ex in examples):
        raise DataError(f"{role}: rows with 'tests' run client code on the server, which this server does not allow "
                        "(the operator can turn it on with SPD_ALLOW_CLIENT_CODE=1; use dataset 'humaneval' otherwise)")
    source.n = len(examples)
    return source


def check_lengths(server: JobHost, job_dir: Path, source: Source, task: str, max_tokens: int, role: str) -> None:
    """A job's prompts are held to the served context like requests: prompt + max_tokens must fit."""
    from spd_engine.formatting import prompt_ids

    limit = server.max_model_len
    for ex in examples_of(job_dir, source, task):
        n = len(prompt_ids(server.tokenizer, task, ex))
        if n + max_tokens > limit:
            raise DataError(f"{role}: example {ex.id!r} has {n} prompt tokens; with max_tokens {max_tokens} that "
                            f"exceeds the served context of {limit} tokens")


def source_path(job_dir: Path, source: Source):
    if source.dataset:
        return source.dataset if source.dataset == "humaneval" else resolve_data(source.dataset)
    return job_dir / source.file


def examples_of(job_dir: Path, source: Source, task: str):
    return load_examples(source_path(job_dir, source), task, limit=source.limit)


# ---------------------------------------------------------------- subprocess steps


def run_subprocess(ctx: JobContext, spec: dict, name: str) -> dict:
    from .worker_proc import die_with_parent

    spec_path = ctx.dir / f"{name}.task.json"
    write_json(spec_path, spec)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "server.worker_proc", str(spec_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=die_with_parent,
                            cwd=str(Path(__file__).resolve().parent.parent))
    ctx.proc = proc
    result, error = None, None
    tail: collections.deque[str] = collections.deque(maxlen=200)  # stderr, read as it comes: a full pipe blocks the child
    drain = threading.Thread(target=tail.extend, args=(proc.stderr,), daemon=True)
    drain.start()
    try:
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "progress" in msg:
                done, total = msg["progress"]
                if ctx.total != total:
                    ctx.set_total(total)
                ctx.set_done(done)
            result = msg.get("result", result)
            error = msg.get("error", error)
        rc = proc.wait()
    finally:
        ctx.proc = None
        if proc.poll() is None:
            proc.kill()
    drain.join(timeout=5)
    ctx.check()
    if rc != 0 or result is None:
        raise RuntimeError(error or f"{name} worker exited with code {rc}: {''.join(tail)[-1500:]}")
    return result


def calibrate(server: JobHost, ctx: JobContext, name: str, task: str, cfg: CalibrationConfig, source: Source) -> dict:
    label = f"job {ctx.id} ({source.dataset or 'upload'})"
    if name in server.store.names():
        manifest = server.store.load(name, server.model_info).manifest
        if manifest.calibration.data != label:
            raise ValueError(f"a subspace named {name!r} already exists")
        result = calibration_result(manifest)  # this job wrote it, then a restart interrupted it: finish
    else:
        spec = {"step": "calibrate", "model": str(server.model_path), "store": str(server.store.root),
                "data": str(source_path(ctx.dir, source)), "limit": source.limit, "task": task, "name": name,
                "cfg": narrow(cfg, CalibrationConfig).model_dump(mode="json"), "data_label": label}
        result = run_subprocess(ctx, spec, "calibrate")
    server.add_mode(name)  # hot: the next request can use it
    return result


def distill(server: JobHost, ctx: JobContext, corpus: Path, out: Path, cfg: DistillConfig) -> dict:
    from spd_engine.distill import TRAINING_REPORT

    report = out / TRAINING_REPORT
    if report.is_file():  # the job's adapter, published (by rename) before a restart interrupted the job
        return distill_result(json.loads(report.read_text()))
    spec = {"step": "distill", "model": str(server.model_path), "corpus": str(corpus), "out": str(out),
            "cfg": cfg.model_dump(mode="json")}
    return run_subprocess(ctx, spec, "distill")


def load_adapter(server: JobHost, name: str, path: Path) -> None:
    """Hot-load a job's adapter. One already loaded under this name from this path is the job's
    own, loaded before a restart interrupted the job."""
    try:
        server.call(server.load_adapter(name, path))
    except Exception:
        if server.adapter_paths().get(name) != str(path):
            raise


# ---------------------------------------------------------------- in-process steps


def generate(server: JobHost, ctx: JobContext, task: str, source: Source, gen: GenerationConfig,
             out_name: str = "corpus.jsonl") -> dict:
    from spd_engine.corpus import generate_corpus

    examples = examples_of(ctx.dir, source, task)
    ctx.set_total(len(examples))
    ctx.set_done(0)
    final = ctx.dir / out_name
    if final.exists():  # finished before a crash between publish and bookkeeping
        return {"written": 0, "skipped": len(examples), "total": len(examples), "path": out_name}
    partial = ctx.dir / f".{out_name}.partial"  # hidden and resumable; published by rename
    chunk = getattr(server.backend, "batch_size", 16)
    res = generate_corpus(server.backend, task, examples, partial, capability=tuple(sorted(set(gen.capability))),
                          strength=gen.strength, max_tokens=gen.max_tokens, temperature=gen.temperature,
                          top_p=gen.top_p, seed=gen.seed, chunk=chunk, progress=ctx.advance)
    os.replace(partial, final)
    return {**res, "path": out_name}


def evaluate(server: JobHost, ctx: JobContext, task: str, source: Source, ev: EvaluationConfig, adapter: str | None,
             out_name: str = "report.json") -> dict:
    from spd_engine.evaluate import accuracy

    examples = examples_of(ctx.dir, source, task)
    ctx.set_total(len(examples))
    res = accuracy(server.backend, task, examples, capability=tuple(sorted(set(ev.capability))), strength=ev.strength,
                   adapter=adapter, max_tokens=ev.max_tokens, progress=ctx.advance)
    report = {**res.summary(), "task": task, "capability": ev.capability, "adapter": adapter, "items": res.items}
    write_json(ctx.dir / out_name, report)
    return res.summary()


PROVENANCE = "spd_provenance.json"  # beside an adapter's PEFT files: what it was made from
MAX_PROVENANCE_BYTES = 1 << 20


def mode_provenance(server: JobHost, name: str) -> dict:
    """A mode as a corpus was generated under it: its pack's digest and its calibration data's sha256."""
    try:
        pack = server.store.load(name, server.model_info)
        return {"name": name, "digest": server.store.digest(name),
                "calibration_sha256": pack.manifest.calibration.data_sha256, "method": pack.manifest.method}
    except (KeyError, ValueError, OSError):
        return {"name": name, "digest": None, "calibration_sha256": None, "method": None}  # deleted since


def write_provenance(server: JobHost, ctx: JobContext, adapter_dir: Path, corpus: Path, generation: GenerationConfig,
                     distill_cfg: DistillConfig) -> dict:
    """Record, in the adapter's directory, the job that made it, the corpus (sha256 and the settings
    it was generated with, the modes with their pack digests and calibration data hashes) and
    every distillation setting, the seed included."""
    record = {"job": ctx.id, "job_type": ctx.job["type"], "model": server.model_id,
              "corpus_sha256": data_sha256(corpus),
              "generation": generation.model_dump(mode="json"),
              "modes": [mode_provenance(server, n) for n in generation.capability],
              "distill": distill_cfg.model_dump(mode="json")}
    write_json(adapter_dir / PROVENANCE, record)
    return record


def read_provenance(adapter_dir: Path) -> dict | None:
    """An adapter's provenance record (None for an adapter no job made, or an unreadable record)."""
    path = adapter_dir / PROVENANCE
    try:
        if path.stat().st_size > MAX_PROVENANCE_BYTES:
            return None
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def compare_arms(job_dir: Path, reports: dict[str, str]) -> dict:
    """spd against each other arm on the same evaluation items: the paired difference in accuracy
    with its 95% bootstrap interval, and the exact McNemar test."""
    from spd_engine.stats import mcnemar_exact, paired_bootstrap

    correct = {arm: [bool(it["correct"]) for it in json.loads((job_dir / name).read_text())["items"]]
               for arm, name in reports.items()}
    out = {}
    for other in (a for a in correct if a != "spd"):
        boot = paired_bootstrap([float(c) for c in correct["spd"]], [float(c) for c in correct[other]])
        out[f"spd-vs-{other}"] = {"diff": boot["diff"], "ci_low": boot["ci_low"], "ci_high": boot["ci_high"],
                                  "mcnemar": mcnemar_exact(correct["spd"], correct[other])}
    return out


# ---------------------------------------------------------------- the runners, one per job type


def corpus_generation(job: dict) -> GenerationConfig:
    """The settings a succeeded generate or pipeline job made its corpus with (a pipeline's spd arm)."""
    rec = load_record(job)
    if isinstance(rec, PipelineRecord):
        return rec.generation([rec.name])
    if isinstance(rec, GenerateRecord):
        return narrow(rec, GenerationConfig)
    raise ValueError(f"job {job['id']!r} is a {job['type']} job: it made no corpus")


def make_runners(server: JobHost, store: JobStore):
    def run_calibrate(ctx: JobContext):
        p = load_record(ctx.job)
        return calibrate(server, ctx, p.name, p.task, p, p.inputs.calibration), None

    def run_generate(ctx: JobContext):
        p = load_record(ctx.job)
        return generate(server, ctx, p.task, p.inputs.prompts, narrow(p, GenerationConfig)), "corpus.jsonl"

    def run_distill(ctx: JobContext):
        p = load_record(ctx.job)
        src = store.get(p.corpus_job)
        corpus = server.settings.jobs_dir / p.corpus_job / "corpus.jsonl"
        if src is None or src["state"] != "succeeded" or not corpus.is_file():
            raise ValueError(f"job {p.corpus_job!r} has no finished corpus")
        made = corpus_generation(src)
        cfg = narrow(p, DistillConfig)
        result = distill(server, ctx, corpus, ctx.dir / "adapter", cfg)
        write_provenance(server, ctx, ctx.dir / "adapter", corpus, made, cfg)
        if p.adapter_name:
            load_adapter(server, p.adapter_name, ctx.dir / "adapter")
            result["adapter_loaded"] = p.adapter_name
        return result, "adapter"

    def run_evaluate(ctx: JobContext):
        p = load_record(ctx.job)
        return evaluate(server, ctx, p.task, p.inputs.data, narrow(p, EvaluationConfig), p.adapter), "report.json"

    def run_pipeline(ctx: JobContext):
        p = load_record(ctx.job)
        task, ins, result = p.task, p.inputs, {}
        result["calibrate"] = calibrate(server, ctx, p.name, task, p.calibration_params, ins.calibration)
        cfg = narrow(p, DistillConfig)
        adapter = p.adapter_name or f"{p.name}-{ctx.id[-6:]}"
        # the spd arm, then each control arm: (arm, its generation's capability, corpus, adapter dir, adapter name)
        arms = [("spd", [p.name], "corpus.jsonl", "adapter", adapter)]
        if "self-distill" in p.controls:
            arms.append(("self-distill", [], "corpus_self-distill.jsonl", "adapter_self-distill", f"{adapter}-self-distill"))
        for arm, capability, corpus, out, name in arms:
            gen = p.generation(capability)
            key = "" if arm == "spd" else f"_{arm}"
            result[f"generate{key}"] = generate(server, ctx, task, ins.prompts, gen, corpus)
            result[f"distill{key}"] = distill(server, ctx, ctx.dir / corpus, ctx.dir / out, cfg)
            write_provenance(server, ctx, ctx.dir / out, ctx.dir / corpus, gen, cfg)
            load_adapter(server, name, ctx.dir / out)
        result["adapter_loaded"] = adapter
        ev = ins.eval_data or ins.calibration  # scored data needs gold answers
        reports = {"base": (None, "report_base.json"), **{arm: (name, "report.json" if arm == "spd" else
                                                                f"report_{arm}.json") for arm, *_, name in arms}}
        result["evaluate"] = {arm: evaluate(server, ctx, task, ev, p.evaluation(), name, report)
                              for arm, (name, report) in reports.items()}
        result["evaluate"]["adapter"] = result["evaluate"]["spd"]  # the name before controls existed (one release)
        if len(arms) > 1:
            result["compare"] = compare_arms(ctx.dir, {arm: report for arm, (_, report) in reports.items()})
        return result, "adapter"

    return {"calibrate": run_calibrate, "generate": run_generate, "distill": run_distill,
            "evaluate": run_evaluate, "pipeline": run_pipeline}
