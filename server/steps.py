"""The job kinds: what each job does, by calling spd_engine (no method code here).

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

from spd_engine.atomic import write_json
from spd_engine.data import DataError, load_examples, resolve_data

from .jobs import JobContext, JobStore
from .state import SPDServer

INPUTS = "inputs"


# ---------------------------------------------------------------- inputs (validated at submission)


def prepare_data(spec: dict, kind: str, job_dir: Path, role: str, allow_code: bool = False) -> dict:
    """Write an inline data spec into the job dir and validate it; a DataError names `role:line`.
    Inline rows with their own unit tests are refused unless the operator allows client code
    (SPD_ALLOW_CLIENT_CODE): scoring them runs that code on the server."""
    if spec.get("dataset"):  # exactly one source: DataSpec checked it
        source = {"dataset": spec["dataset"], "limit": spec.get("limit")}
    else:
        text = spec["data"] if spec.get("data") is not None else "\n".join(json.dumps(e) for e in spec["examples"])
        path = job_dir / INPUTS / f"{role}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        source = {"file": f"{INPUTS}/{role}.jsonl", "limit": spec.get("limit")}
    try:
        examples = load_examples(source_path(job_dir, source), kind, limit=source["limit"])
    except DataError as e:
        raise DataError(str(e).replace(str(job_dir / INPUTS / f"{role}.jsonl"), role)) from None
    if not examples:
        raise DataError(f"{role}: no examples")
    if not spec.get("dataset") and not allow_code and any(ex.tests for ex in examples):
        raise DataError(f"{role}: rows with 'tests' run client code on the server, which this server does not allow "
                        "(the operator can turn it on with SPD_ALLOW_CLIENT_CODE=1; use dataset 'humaneval' otherwise)")
    source["n"] = len(examples)
    return source


def check_lengths(server: SPDServer, job_dir: Path, source: dict, kind: str, max_tokens: int, role: str) -> None:
    """A job's prompts are held to the served context like requests: prompt + max_tokens must fit."""
    from spd_engine.formatting import prompt_ids

    limit = server.max_model_len
    for ex in examples_of(job_dir, source, kind):
        n = len(prompt_ids(server.tokenizer, kind, ex))
        if n + max_tokens > limit:
            raise DataError(f"{role}: example {ex.id!r} has {n} prompt tokens; with max_tokens {max_tokens} that "
                            f"exceeds the served context of {limit} tokens")


def source_path(job_dir: Path, source: dict):
    if "dataset" in source:
        ds = source["dataset"]
        return ds if ds == "humaneval" else resolve_data(ds)
    return job_dir / source["file"]


def examples_of(job_dir: Path, source: dict, kind: str):
    return load_examples(source_path(job_dir, source), kind, limit=source.get("limit"))


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


def calibrate(server: SPDServer, ctx: JobContext, p: dict, source: dict) -> dict:
    if p["name"] in server.store.names():
        raise ValueError(f"a subspace named {p['name']!r} already exists")
    cfg = {k: p.get(k) for k in ("layers", "kinds", "granularity", "method", "rank", "energy")}
    spec = {"task": "calibrate", "model": str(server.model_path), "store": str(server.store.root),
            "data": str(source_path(ctx.dir, source)), "limit": source.get("limit"), "kind": p["kind"],
            "name": p["name"], "cfg": cfg, "data_label": f"job {ctx.id} ({source.get('dataset') or 'upload'})"}
    result = run_subprocess(ctx, spec, "calibrate")
    server.add_mode(p["name"])  # hot: the next request can use it
    return result


def distill(server: SPDServer, ctx: JobContext, corpus: Path, out: Path, cfg: dict) -> dict:
    spec = {"task": "distill", "model": str(server.model_path), "corpus": str(corpus), "out": str(out), "cfg": cfg}
    return run_subprocess(ctx, spec, "distill")


# ---------------------------------------------------------------- in-process steps


def generate(server: SPDServer, ctx: JobContext, kind: str, source: dict, p: dict, out_name: str = "corpus.jsonl") -> dict:
    from spd_engine.corpus import generate_corpus

    examples = examples_of(ctx.dir, source, kind)
    ctx.set_total(len(examples))
    ctx.set_done(0)
    final = ctx.dir / out_name
    if final.exists():  # finished before a crash between publish and bookkeeping
        return {"written": 0, "skipped": len(examples), "total": len(examples), "path": out_name}
    partial = ctx.dir / f".{out_name}.partial"  # hidden and resumable; published by rename
    chunk = getattr(server.backend, "batch_size", 16)
    res = generate_corpus(server.backend, kind, examples, partial, capability=tuple(sorted(set(p.get("capability", [])))),
                          strength=p.get("strength", 1.0), max_tokens=p.get("max_tokens", 256),
                          temperature=p.get("temperature", 0.0), seed=p.get("seed"), chunk=chunk, progress=ctx.advance)
    os.replace(partial, final)
    return {**res, "path": out_name}


def evaluate(server: SPDServer, ctx: JobContext, kind: str, source: dict, p: dict, out_name: str = "report.json") -> dict:
    from spd_engine.evaluate import accuracy

    examples = examples_of(ctx.dir, source, kind)
    ctx.set_total(len(examples))
    res = accuracy(server.backend, kind, examples, capability=tuple(sorted(set(p.get("capability", [])))),
                   strength=p.get("strength", 1.0), adapter=p.get("adapter"), max_tokens=p.get("max_tokens", 256),
                   progress=ctx.advance)
    report = {**res.summary(), "kind": kind, "capability": p.get("capability", []), "adapter": p.get("adapter"),
              "items": res.items}
    write_json(ctx.dir / out_name, report)
    return res.summary()


# ---------------------------------------------------------------- the runners, one per job kind


def make_runners(server: SPDServer, store: JobStore):
    def run_calibrate(ctx: JobContext):
        p = ctx.job["params"]
        return calibrate(server, ctx, p, p["_inputs"]["calibration"]), None

    def run_generate(ctx: JobContext):
        p = ctx.job["params"]
        return generate(server, ctx, p["task_kind"], p["_inputs"]["prompts"], p), "corpus.jsonl"

    def run_distill(ctx: JobContext):
        p = ctx.job["params"]
        src = store.get(p["corpus_job"])
        corpus = server.settings.jobs_dir / p["corpus_job"] / "corpus.jsonl"
        if src is None or src["state"] != "succeeded" or not corpus.is_file():
            raise ValueError(f"job {p['corpus_job']!r} has no finished corpus")
        cfg = {k: p[k] for k in ("epochs", "lr", "lora_rank", "lora_alpha", "batch_size", "max_length", "seed")}
        result = distill(server, ctx, corpus, ctx.dir / "adapter", cfg)
        if p.get("adapter_name"):
            server.call(server.load_adapter(p["adapter_name"], ctx.dir / "adapter"))
            result["adapter_loaded"] = p["adapter_name"]
        return result, "adapter"

    def run_evaluate(ctx: JobContext):
        p = ctx.job["params"]
        return evaluate(server, ctx, p["task_kind"], p["_inputs"]["data"], p), "report.json"

    def run_pipeline(ctx: JobContext):
        p = ctx.job["params"]
        kind, ins, result = p["task_kind"], p["_inputs"], {}
        cal = {"name": p["name"], "kind": kind, **p.get("calibration_params", {})}
        result["calibrate"] = calibrate(server, ctx, cal, ins["calibration"])
        gen = {"capability": [p["name"]], "strength": p["strength"], "max_tokens": p["max_tokens"]}
        result["generate"] = generate(server, ctx, kind, ins["prompts"], gen)
        cfg = {"epochs": p["epochs"], "lr": p["lr"], "lora_rank": p["lora_rank"], "lora_alpha": float(p["lora_rank"]),
               "batch_size": 4, "max_length": 1024, "seed": 42}
        result["distill"] = distill(server, ctx, ctx.dir / "corpus.jsonl", ctx.dir / "adapter", cfg)
        adapter = p.get("adapter_name") or f"{p['name']}-{ctx.id[-6:]}"
        server.call(server.load_adapter(adapter, ctx.dir / "adapter"))
        result["adapter_loaded"] = adapter
        ev = ins.get("eval_data") or ins["calibration"]  # scored data needs gold answers
        result["evaluate"] = {
            "base": evaluate(server, ctx, kind, ev, {"max_tokens": p["max_tokens"]}, "report_base.json"),
            "adapter": evaluate(server, ctx, kind, ev, {"max_tokens": p["max_tokens"], "adapter": adapter}, "report.json"),
        }
        return result, "adapter"

    return {"calibrate": run_calibrate, "generate": run_generate, "distill": run_distill,
            "evaluate": run_evaluate, "pipeline": run_pipeline}
