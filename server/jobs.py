"""Durable jobs: a SQLite store (WAL) in the data dir, and one worker thread that runs them.

One job system per data dir, whatever the number of API-server processes (`--api-server-count`):
every process accepts, lists and cancels jobs through the store, and only the process holding an
exclusive lock on `<data>/jobs.lock` runs them (the others wait for the lock, so one takes over if
its holder dies). Start-up recovery runs when the lock is taken, so it never touches a job another
live process is running. A cancel that reaches a process that is not running the job is recorded
in the store (`cancels`) and carried out by the running process within half a second.

States: queued -> running -> succeeded | failed | cancelled. Queued jobs survive a restart. A job
found `running` at startup was interrupted by a crash: generation is resumed (its corpus file is
append-only and resumable), every other type is marked failed with the reason, and its hidden
temporary files are removed (artifacts are only ever published by an atomic rename). A job put
back in the queue at shutdown runs again from its first step; a step finds its own published
output (a pack, an adapter) and does not redo it (`steps`).
"""
from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

log = logging.getLogger("spd.jobs")

INTERRUPTED = "interrupted: the server stopped while it ran"
RESUMABLE = {"generate"}
FINAL = {"succeeded", "failed", "cancelled"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, type TEXT NOT NULL, state TEXT NOT NULL, params TEXT NOT NULL,
    done INTEGER NOT NULL DEFAULT 0, total INTEGER NOT NULL DEFAULT 0,
    result TEXT, error TEXT, artifact TEXT,
    created REAL NOT NULL, started REAL, finished REAL
);
CREATE TABLE IF NOT EXISTS cancels (id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)"""


class Cancelled(Exception):
    pass


class JobStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._rename_kind_column()

    def _rename_kind_column(self) -> None:
        """A store made before issue 23 names a job's type `kind`: the column is renamed, once (by
        whichever process gets there first; the stored parameters load through `schemas.load_record`)."""
        if any(col["name"] == "kind" for col in self._db.execute("PRAGMA table_info(jobs)")):
            try:
                self._db.execute("ALTER TABLE jobs RENAME COLUMN kind TO type")
            except sqlite3.OperationalError:  # another process renamed it meanwhile
                if any(col["name"] == "kind" for col in self._db.execute("PRAGMA table_info(jobs)")):
                    raise

    def _exec(self, sql: str, args=()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    @staticmethod
    def new_id() -> str:
        return "job-" + uuid.uuid4().hex[:16]

    def create(self, job_id: str, job_type: str, params: dict) -> dict:
        self._exec("INSERT INTO jobs (id, type, state, params, created) VALUES (?, ?, 'queued', ?, ?)",
                   (job_id, job_type, json.dumps(params), time.time()))
        return self.get(job_id)

    def get(self, job_id: str) -> dict | None:
        rows = self._exec("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _public(rows[0]) if rows else None

    def list(self, state: str | None = None, limit: int = 100) -> list[dict]:
        if state:
            rows = self._exec("SELECT * FROM jobs WHERE state = ? ORDER BY created DESC LIMIT ?", (state, limit))
        else:
            rows = self._exec("SELECT * FROM jobs ORDER BY created DESC LIMIT ?", (limit,))
        return [_public(r) for r in rows]

    def counts(self) -> dict[str, int]:
        return {r["state"]: r["n"] for r in self._exec("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")}

    def next_queued(self) -> dict | None:
        rows = self._exec("SELECT * FROM jobs WHERE state = 'queued' ORDER BY created LIMIT 1")
        return _public(rows[0]) if rows else None

    def update(self, job_id: str, **fields) -> None:
        for k in ("result", "params"):
            if k in fields and fields[k] is not None:
                fields[k] = json.dumps(fields[k])
        cols = ", ".join(f"{k} = ?" for k in fields)
        self._exec(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def delete(self, job_id: str) -> bool:
        """Forget a finished job (its directory is the caller's); False when it is not finished."""
        marks = ", ".join("?" * len(FINAL))
        with self._lock:
            return self._db.execute(f"DELETE FROM jobs WHERE id = ? AND state IN ({marks})",
                                    (job_id, *FINAL)).rowcount == 1

    def expired(self, keep: int) -> list[str]:
        """Finished jobs beyond the newest `keep` finished ones (the retention rule)."""
        marks = ", ".join("?" * len(FINAL))
        rows = self._exec(f"SELECT id FROM jobs WHERE state IN ({marks}) ORDER BY created DESC LIMIT -1 OFFSET ?",
                          (*FINAL, keep))
        return [r["id"] for r in rows]

    def request_cancel(self, job_id: str) -> None:
        self._exec("INSERT OR IGNORE INTO cancels (id) VALUES (?)", (job_id,))

    def take_cancel(self, job_id: str) -> bool:
        """Whether a cancel of `job_id` was requested (forgotten here)."""
        with self._lock:
            return self._db.execute("DELETE FROM cancels WHERE id = ?", (job_id,)).rowcount == 1

    def next_number(self, name: str) -> int:
        """The next value of a counter shared by every process of the server (1, 2, ...)."""
        with self._lock:
            row = self._db.execute("INSERT INTO counters (name, value) VALUES (?, 1) ON CONFLICT(name) "
                                   "DO UPDATE SET value = value + 1 RETURNING value", (name,)).fetchone()
        return row[0]

    def transition(self, job_id: str, from_states: set[str], to: str, **fields) -> bool:
        """Atomically move a job from one of `from_states` to `to`; False when it was elsewhere."""
        for k in ("result",):
            if k in fields and fields[k] is not None:
                fields[k] = json.dumps(fields[k])
        sets = ", ".join(["state = ?"] + [f"{k} = ?" for k in fields])
        marks = ", ".join("?" * len(from_states))
        with self._lock:
            cur = self._db.execute(f"UPDATE jobs SET {sets} WHERE id = ? AND state IN ({marks})",
                                   (to, *fields.values(), job_id, *from_states))
            return cur.rowcount == 1


def _public(row: sqlite3.Row) -> dict:
    d = dict(row)
    d["params"] = json.loads(d["params"])
    d["result"] = json.loads(d["result"]) if d["result"] else None
    d["progress"] = round(d["done"] / d["total"], 4) if d["total"] else (1.0 if d["state"] == "succeeded" else 0.0)
    return d


class JobContext:
    """What a running step sees: progress reporting, cancellation, its directory."""

    def __init__(self, store: JobStore, job: dict, directory: Path):
        self.store, self.job, self.dir = store, job, directory
        self.id = job["id"]
        self.cancelled = threading.Event()
        self.requeue = False  # cancelled by a shutdown: back to the queue, not "cancelled by a client"
        self.proc = None  # a worker subprocess, killed on cancel
        self.done, self.total = 0, 0

    def set_total(self, total: int) -> None:
        self.total = total
        self.store.update(self.id, total=total, done=self.done)

    def advance(self, n: int = 1) -> None:
        self.check()
        if n:
            self.done = min(self.total, self.done + n) if self.total else self.done + n
            self.store.update(self.id, done=self.done)

    def set_done(self, done: int) -> None:
        self.done = done
        self.store.update(self.id, done=done)

    def check(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled()

    def cancel(self, requeue: bool = False) -> None:
        self.requeue = self.requeue or requeue
        self.cancelled.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()


Runner = Callable[[JobContext], tuple[dict, str | None]]  # -> (result, artifact file name)


class Worker:
    """Runs queued jobs one at a time in a thread of the server process (heavy steps start their
    own subprocess, so serving is never blocked by training)."""

    def __init__(self, store: JobStore, jobs_dir: Path, runners: dict[str, Runner], lock_path: Path):
        self.store, self.jobs_dir, self.runners, self.lock_path = store, Path(jobs_dir), runners, Path(lock_path)
        self.leading = threading.Event()  # this process holds the lock: it runs the jobs
        self.current: JobContext | None = None
        self._cancel_requested: set[str] = set()  # cancelled between leaving the queue and starting
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def recover(self) -> None:
        """After a restart: resume or fail what was running; drop hidden temporaries."""
        for job in self.store.list(state="running", limit=10_000):
            if job["type"] in RESUMABLE:  # its hidden partial corpus is kept and resumed
                self.store.transition(job["id"], {"running"}, "queued")
                log.info("job %s resumes after a restart", job["id"])
                continue
            self.store.transition(job["id"], {"running"}, "failed", error=INTERRUPTED, finished=time.time())
            log.warning("job %s failed: %s", job["id"], INTERRUPTED)
            self._drop_temporaries(job["id"])

    def _drop_temporaries(self, job_id: str) -> None:
        d = self.job_dir(job_id)
        if d.is_dir():
            for p in d.iterdir():
                if p.name.startswith("."):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._lead, name="spd-job-worker", daemon=True)
        self._thread.start()

    def _lead(self) -> None:
        import fcntl

        self._lock_file = lock = open(self.lock_path, "a")  # held (open) until stop() or the process ends
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("jobs run in another API-server process (it holds %s); this one waits to take over", self.lock_path)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if self._stop.is_set():
            return
        self.leading.set()
        self.recover()
        threading.Thread(target=self._watch_cancels, name="spd-job-cancels", daemon=True).start()
        self._loop()

    def _watch_cancels(self) -> None:
        while not self._stop.wait(0.5):
            cur = self.current
            if cur is not None and self.store.take_cancel(cur.id):
                cur.cancel()

    def stop(self) -> None:
        """Shut down: the running job goes back to the queue (a resumable one keeps its partial
        output and resumes at the next start; any other starts again), not "cancelled"."""
        self._stop.set()
        self._wake.set()
        cur = self.current
        if cur:
            cur.cancel(requeue=True)
        if self._thread and self.leading.is_set():  # a waiting thread stays blocked on the lock
            self._thread.join(timeout=30)
        if cur and self.store.transition(cur.id, {"running"}, "queued"):  # the thread did not get there
            log.info("job %s re-queued at shutdown", cur.id)
        if self.leading.is_set():
            self.leading.clear()
            self._lock_file.close()  # another API-server process takes over

    def notify(self) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; False when it had already finished."""
        with self._lock:
            if self.store.transition(job_id, {"queued"}, "cancelled", finished=time.time()):
                return True
            cur = self.current
            if cur is not None and cur.id == job_id:
                cur.cancel()
                return True
            job = self.store.get(job_id)
            if job is not None and job["state"] == "running":
                if self.leading.is_set():  # between leaving the queue and starting
                    self._cancel_requested.add(job_id)
                else:
                    self.store.request_cancel(job_id)  # the process running it carries it out
                return True
            return False

    def _loop(self) -> None:
        while not self._stop.is_set():
            job = self.store.next_queued()
            if job is None:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            if not self.store.transition(job["id"], {"queued"}, "running", started=time.time()):
                continue
            self._run(job)

    def _run(self, job: dict) -> None:
        d = self.job_dir(job["id"])
        d.mkdir(parents=True, exist_ok=True)
        ctx = JobContext(self.store, job, d)
        with self._lock:
            self.current = ctx
            if job["id"] in self._cancel_requested or self.store.take_cancel(job["id"]):
                self._cancel_requested.discard(job["id"])
                ctx.cancel()
        try:
            result, artifact = self.runners[job["type"]](ctx)
            if ctx.cancelled.is_set():
                raise Cancelled()
            self.store.transition(job["id"], {"running"}, "succeeded", result=result, artifact=artifact,
                                  finished=time.time(), done=ctx.total or ctx.done)
            log.info("job %s succeeded", job["id"])
        except Exception as e:  # noqa: BLE001 - a failing job must not stop the worker
            msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
            if ctx.requeue:
                self.store.transition(job["id"], {"running"}, "queued", done=0)
                if job["type"] not in RESUMABLE:
                    self._drop_temporaries(job["id"])
                log.info("job %s re-queued at shutdown", job["id"])
            elif ctx.cancelled.is_set():
                self.store.transition(job["id"], {"running"}, "cancelled", error="cancelled by a client", finished=time.time())
                log.info("job %s cancelled", job["id"])
            else:
                self.store.transition(job["id"], {"running"}, "failed", error=f"{type(e).__name__}: {msg}"[:4000],
                                      finished=time.time())
                log.warning("job %s failed: %s", job["id"], msg)
        finally:
            with self._lock:
                self.current = None
