"""The job worker without a server: cancellation racing a job's start, shutdown re-queueing, a
worker subprocess that writes a lot to stderr, and steps re-run after a restart interrupted them
past their output (a saved pack, a published adapter, a loaded adapter), which finish with it."""
from __future__ import annotations

import threading

import pytest

from server import steps
from server.jobs import JobContext, JobStore, Worker


def _store(tmp_path) -> JobStore:
    return JobStore(tmp_path / "jobs.sqlite3")


def test_a_cancel_between_leaving_the_queue_and_starting_cancels_the_job(tmp_path):
    store = _store(tmp_path)
    ran = []
    worker = Worker(store, tmp_path / "jobs", {"generate": lambda ctx: (ctx.check(), ran.append(1), ({}, None))[-1]},
                    tmp_path / "jobs.lock")
    job = store.create("job-1", "generate", {})
    assert store.transition("job-1", {"queued"}, "running")  # the worker took it, has not started it
    assert worker.cancel("job-1")
    worker._run(store.get("job-1"))
    assert store.get("job-1")["state"] == "cancelled" and not ran
    assert not worker.cancel(job["id"])  # finished: nothing to cancel


def test_a_shutdown_puts_the_running_job_back_in_the_queue(tmp_path):
    store = _store(tmp_path)
    worker = Worker(store, tmp_path / "jobs", {}, tmp_path / "jobs.lock")

    def runner(ctx: JobContext):
        worker.current.cancel(requeue=True)  # what Worker.stop does to the running job
        ctx.check()

    worker.runners["calibrate"] = runner
    store.create("job-2", "calibrate", {})
    store.transition("job-2", {"queued"}, "running")
    worker._run(store.get("job-2"))
    job = store.get("job-2")
    assert job["state"] == "queued" and job["error"] is None


def test_a_worker_subprocess_writing_megabytes_to_stderr_does_not_block(tmp_path, monkeypatch):
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\nhead -c 3000000 /dev/zero | tr '\\\\0' x >&2\necho '{\"result\": {\"ok\": true}}'\n")
    fake.chmod(0o755)
    monkeypatch.setattr(steps.sys, "executable", str(fake))
    store = _store(tmp_path)
    store.create("job-3", "calibrate", {})
    ctx = JobContext(store, store.get("job-3"), tmp_path)
    out = []
    t = threading.Thread(target=lambda: out.append(steps.run_subprocess(ctx, {}, "fake")), daemon=True)
    t.start()
    t.join(timeout=60)
    if t.is_alive():  # a full stderr pipe blocks the child, and the worker waits for it forever
        ctx.cancel()
    assert out == [{"ok": True}]


def test_retention_lists_finished_jobs_beyond_the_newest_n(tmp_path):
    store = _store(tmp_path)
    for i in range(5):
        store.create(f"job-{i}", "generate", {})
        store.transition(f"job-{i}", {"queued"}, "succeeded")
    store.create("job-q", "generate", {})
    assert sorted(store.expired(3)) == ["job-0", "job-1"]
    assert store.delete("job-0") and not store.delete("job-q")
    assert store.get("job-q")["state"] == "queued"


def _until(cond, timeout: float = 10.0) -> bool:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_two_api_server_processes_share_one_job_system_and_a_cancel_reaching_either_stops_the_job(tmp_path):
    """Two workers on one data dir, each with its own database connection (as two API-server
    processes under --api-server-count 2): one runs the jobs, the second's start-up recovery leaves
    the running job alone, its cancel stops it, and it takes over when the first stops."""
    import time

    started = threading.Event()

    def slow(ctx: JobContext):
        started.set()
        while True:
            ctx.check()
            time.sleep(0.05)

    def worker() -> tuple[JobStore, Worker]:
        store = JobStore(tmp_path / "jobs.sqlite3")
        return store, Worker(store, tmp_path / "jobs", {"calibrate": slow, "generate": lambda ctx: ({"ok": 1}, None)},
                             tmp_path / "jobs.lock")

    store_a, a = worker()
    a.start()
    assert _until(a.leading.is_set)
    store_a.create("job-1", "calibrate", {})
    assert started.wait(10)
    store_b, b = worker()
    b.start()
    time.sleep(1.0)
    assert not b.leading.is_set() and store_b.get("job-1")["state"] == "running"  # not failed as "interrupted"
    assert b.cancel("job-1")
    assert _until(lambda: store_b.get("job-1")["state"] == "cancelled"), store_b.get("job-1")
    a.stop()
    assert _until(b.leading.is_set)  # the lock passed to the waiting process
    store_b.create("job-2", "generate", {})
    b.notify()
    assert _until(lambda: store_a.get("job-2")["state"] == "succeeded")
    b.stop()


def test_a_counter_shared_by_two_connections_never_repeats_a_value(tmp_path):
    a, b = JobStore(tmp_path / "db.sqlite3"), JobStore(tmp_path / "db.sqlite3")
    got = [s.next_number("lora") for _ in range(5) for s in (a, b)]
    assert got == list(range(1, 11))


def test_a_job_store_and_records_written_before_the_renames_load(tmp_path):
    """Before issue 23 a job's type was the column `kind`, and its task the parameter `kind`
    (calibrate) or `task_kind` (the others): such a store opens, and its jobs load and list with
    the new names."""
    import json
    import sqlite3

    from server.schemas import load_record

    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    db.executescript("""CREATE TABLE jobs (
        id TEXT PRIMARY KEY, kind TEXT NOT NULL, state TEXT NOT NULL, params TEXT NOT NULL,
        done INTEGER NOT NULL DEFAULT 0, total INTEGER NOT NULL DEFAULT 0,
        result TEXT, error TEXT, artifact TEXT,
        created REAL NOT NULL, started REAL, finished REAL)""")
    old = {"job-c": ("calibrate", {"name": "m", "kind": "math", "calibration": {}, "rank": 4,
                                   "_inputs": {"calibration": {"file": "inputs/calibration.jsonl", "n": 2}}}),
           "job-g": ("generate", {"task_kind": "mcq", "prompts": {"dataset": "gsm8k"}, "max_tokens": 8})}
    for i, (job_id, (kind, params)) in enumerate(old.items()):
        db.execute("INSERT INTO jobs (id, kind, state, params, created) VALUES (?, ?, 'queued', ?, ?)",
                   (job_id, kind, json.dumps(params), float(i)))
    db.commit()
    db.close()

    store = _store(tmp_path)
    assert [(j["id"], j["type"]) for j in store.list()] == [("job-g", "generate"), ("job-c", "calibrate")]
    assert all("kind" not in j for j in store.list())
    cal, gen = load_record(store.get("job-c")), load_record(store.get("job-g"))
    assert (cal.task, cal.rank, cal.inputs.calibration.n) == ("math", 4, 2)
    assert (gen.task, gen.max_tokens) == ("mcq", 8)
    store.create("job-new", "evaluate", {})  # the renamed column takes new jobs
    assert store.get("job-new")["type"] == "evaluate"
    assert _store(tmp_path).get("job-c")["type"] == "calibrate"  # opening it again finds nothing to rename


def test_a_calibrate_job_interrupted_after_writing_its_pack_finishes_at_the_restart(tmp_path, tiny_path, tokenizer,
                                                                                     monkeypatch):
    """A restart found the job running after its subprocess had saved the pack (found by CI: the
    resumed job failed with "already exists"). It now finishes with that pack; a pack of the same
    name from anything else is still refused."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from server.schemas import Source
    from spd_engine import models
    from spd_engine.calibrate import CalibrationConfig, calibrate
    from spd_engine.subspace import Store
    from spd_engine.tasks import Example

    info = models.info(tiny_path)
    ex = [Example(id="a", prompt="What is 2 plus 2?", answer="The answer is 4.")]
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    store = Store(tmp_path / "subspaces")
    added: list[str] = []
    host = SimpleNamespace(store=store, model_info=info, add_mode=added.append)
    monkeypatch.setattr(steps, "run_subprocess", lambda *a: (_ for _ in ()).throw(AssertionError("ran again")))
    jobs = _store(tmp_path)
    cfg, source = CalibrationConfig(layers=[0]), Source(file="inputs/calibration.jsonl")
    for job_id, name, label in [("job-mine", "m", "job job-mine (upload)"), ("job-other", "o", "job job-x (upload)")]:
        store.save(calibrate(model, tokenizer, info, "math", ex, name, cfg, data=label))
        jobs.create(job_id, "calibrate", {})
    mine = JobContext(jobs, jobs.get("job-mine"), tmp_path)
    result = steps.calibrate(host, mine, "m", "math", cfg, source)
    assert result["subspace"] == "m" and result["n_examples"] == 1 and added == ["m"]
    other = JobContext(jobs, jobs.get("job-other"), tmp_path)
    with pytest.raises(ValueError, match="already exists"):
        steps.calibrate(host, other, "o", "math", cfg, source)
    assert added == ["m"]


def test_a_distill_step_interrupted_after_publishing_its_adapter_returns_its_report_at_the_restart(tmp_path,
                                                                                                    monkeypatch):
    import json

    from spd_engine.distill import TRAINING_REPORT

    monkeypatch.setattr(steps, "run_subprocess", lambda *a: (_ for _ in ()).throw(AssertionError("trained again")))
    out = tmp_path / "adapter"
    out.mkdir()
    (out / TRAINING_REPORT).write_text(json.dumps({"steps": 3, "last_loss": 0.5, "config": {"lr": 1}}))
    assert steps.distill(None, None, tmp_path / "corpus.jsonl", out, None) == {"steps": 3, "last_loss": 0.5}


def test_a_jobs_adapter_loaded_before_a_restart_is_kept_and_any_other_of_that_name_still_refused(tmp_path):
    from types import SimpleNamespace

    def refuse(name, path):
        raise RuntimeError(f"an adapter named {name!r} is already loaded")

    loaded = {"mine": str(tmp_path / "adapter")}
    host = SimpleNamespace(call=lambda x: x, load_adapter=refuse, adapter_paths=lambda: loaded)
    steps.load_adapter(host, "mine", tmp_path / "adapter")
    with pytest.raises(RuntimeError, match="already loaded"):
        steps.load_adapter(host, "mine", tmp_path / "other-job" / "adapter")
    with pytest.raises(RuntimeError, match="already loaded"):
        steps.load_adapter(host, "theirs", tmp_path / "adapter")
