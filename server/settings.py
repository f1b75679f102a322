"""The resource API's settings: one immutable object, read from the environment (so `spd serve`
and plain `VLLM_PLUGINS=... vllm serve` configure it the same way). vLLM's own flags (host,
port, API key, limits of the OpenAI routes) stay vLLM's."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from spd_engine.paths import store_dir


def _int(env: dict, name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


@dataclass(frozen=True)
class Settings:
    store_dir: Path  # SPD_STORE_DIR: the subspace store
    data_dir: Path  # SPD_SERVER_DATA: jobs database, job dirs, adapters dir
    max_upload_bytes: int = 16 * 1024 * 1024  # SPD_MAX_UPLOAD_BYTES: calibration files and pack archives
    max_queued_jobs: int = 64  # SPD_MAX_QUEUED_JOBS: 429 above
    job_retention: int = 500  # SPD_JOB_RETENTION: finished jobs kept (with their files); older ones are deleted
    allow_client_code: bool = False  # SPD_ALLOW_CLIENT_CODE=1: jobs may carry their own unit tests (runs code!)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        return cls(store_dir=store_dir(),
                   data_dir=Path(env.get("SPD_SERVER_DATA") or Path.home() / ".local/share/spd").expanduser(),
                   max_upload_bytes=_int(env, "SPD_MAX_UPLOAD_BYTES", cls.max_upload_bytes),
                   max_queued_jobs=_int(env, "SPD_MAX_QUEUED_JOBS", cls.max_queued_jobs),
                   job_retention=_int(env, "SPD_JOB_RETENTION", cls.job_retention),
                   allow_client_code=env.get("SPD_ALLOW_CLIENT_CODE", "") in ("1", "true", "yes"))

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def adapters_file(self) -> Path:
        return self.data_dir / "adapters.json"  # the adapters loaded now, loaded again after a restart

    @property
    def db_path(self) -> Path:
        return self.data_dir / "jobs.sqlite3"

    @property
    def jobs_lock(self) -> Path:
        return self.data_dir / "jobs.lock"  # held by the one API-server process that runs the jobs


@dataclass(frozen=True)
class Limits:
    """Bounds on the OpenAI routes beyond vLLM's own (whose flags bound prompt and output length)."""

    max_inflight: int = 256  # SPD_MAX_INFLIGHT: completion requests in flight; 429 + Retry-After above
    max_prompts: int = 64  # SPD_MAX_PROMPTS: prompts in one completion request
    max_n: int = 16  # SPD_MAX_N: completions per prompt

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Limits":
        env = dict(os.environ if env is None else env)
        return cls(max_inflight=_int(env, "SPD_MAX_INFLIGHT", cls.max_inflight),
                   max_prompts=_int(env, "SPD_MAX_PROMPTS", cls.max_prompts), max_n=_int(env, "SPD_MAX_N", cls.max_n))
