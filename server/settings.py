"""The resource API's settings: one immutable object, read from the environment (so `spd serve`
and plain `VLLM_PLUGINS=... vllm serve` configure it the same way). vLLM's own flags (host,
port, API key, limits of the OpenAI routes) stay vLLM's."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from spd_engine.paths import store_dir


def _int(env: dict, name: str, default: int, maximum: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def _env_int(default: int, env: str, help: str, maximum: int | None = None):
    """A positive integer setting read from `env`: its default, variable, help and bound in one place."""
    return field(default=default, metadata={"env": env, "help": help, "maximum": maximum})


def _ints_from_env(cls, env: dict[str, str]) -> dict[str, int]:
    return {f.name: _int(env, f.metadata["env"], f.default, f.metadata["maximum"])
            for f in fields(cls) if "env" in f.metadata}


@dataclass(frozen=True)
class Settings:
    store_dir: Path  # SPD_STORE_DIR: the subspace store
    data_dir: Path  # SPD_SERVER_DATA: jobs database, job dirs, adapters dir
    max_upload_bytes: int = _env_int(16 * 1024 * 1024, "SPD_MAX_UPLOAD_BYTES", "calibration files and pack archives")
    max_queued_jobs: int = _env_int(64, "SPD_MAX_QUEUED_JOBS", "queued jobs; 429 above")
    job_retention: int = _env_int(500, "SPD_JOB_RETENTION", "finished jobs kept (with their files); older ones are deleted")
    allow_client_code: bool = False  # SPD_ALLOW_CLIENT_CODE=1: jobs may carry their own unit tests (runs code!)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        return cls(store_dir=store_dir(),
                   data_dir=Path(env.get("SPD_SERVER_DATA") or Path.home() / ".local/share/spd").expanduser(),
                   **_ints_from_env(cls, env), allow_client_code=env.get("SPD_ALLOW_CLIENT_CODE", "") in ("1", "true", "yes"))

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

    max_inflight: int = _env_int(256, "SPD_MAX_INFLIGHT", "completion requests in flight; 429 + Retry-After above")
    max_prompts: int = _env_int(64, "SPD_MAX_PROMPTS", "prompts in one completion request")
    max_n: int = _env_int(16, "SPD_MAX_N", "completions per prompt")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Limits":
        return cls(**_ints_from_env(cls, dict(os.environ if env is None else env)))


@dataclass(frozen=True)
class CaptureConfig:
    """The engine plugin's captured route: every layer projects through the masked op over
    persistent buffers (`spd_engine.bank.CapturedBank`), so a CUDA graph that contains the KV write
    replays the current route; a step whose capabilities do not fit or that chooses `auto` modes
    runs eagerly. `SPD_CAPTURED_ROUTE`: `1` always, `0` never (an unsupported CUDA-graph mode is
    lowered instead), unset: exactly when the configured CUDA-graph mode would otherwise be lowered
    (FULL graphs on CUDA; never on the CPU, which captures no graphs)."""

    enabled: bool | None = None  # None: chosen from the CUDA-graph mode when the runner starts
    max_slots: int = _env_int(16, "SPD_CAPTURED_SLOTS", "distinct capabilities one captured-route step holds",
                              maximum=4096)
    max_rank: int = _env_int(256, "SPD_CAPTURED_RANK", "basis columns per site the captured route holds",
                             maximum=4096)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "CaptureConfig":
        env = dict(os.environ if env is None else env)
        flag = env.get("SPD_CAPTURED_ROUTE", "").strip()
        if flag not in _CAPTURED_ROUTE:
            raise ValueError(f"SPD_CAPTURED_ROUTE must be 0 or 1 (or unset: automatic), got {flag!r}")
        return cls(_CAPTURED_ROUTE[flag], **_ints_from_env(cls, env))


_CAPTURED_ROUTE = {"": None, "0": False, "1": True}  # SPD_CAPTURED_ROUTE's values: unset is automatic
