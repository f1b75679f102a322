"""Server settings: one immutable object built by `server.__main__` (flags and env) or by tests."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    model: str = "smollm2-135m"
    backend: str = "auto"  # auto | vllm | hf
    store_dir: Path = Path("subspaces")
    data_dir: Path = Path("spd-data")
    api_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    # limits
    max_body_bytes: int = 16 * 1024 * 1024  # any request body (uploads included) -> 413 above
    max_prompt_tokens: int = 4096  # -> 400
    max_tokens_limit: int = 2048  # per-request max_tokens cap -> 400
    max_batch: int = 64  # requests per Backend.generate call from the batcher
    batch_window_ms: float = 5.0  # how long the batcher waits to collect a batch
    hf_batch_size: int = 16
    run_worker: bool = True  # run the job worker thread inside the server process
    extra: dict = field(default_factory=dict)

    @property
    def adapters_dir(self) -> Path:
        return Path(self.data_dir) / "adapters"

    @property
    def jobs_dir(self) -> Path:
        return Path(self.data_dir) / "jobs"

    @property
    def db_path(self) -> Path:
        return Path(self.data_dir) / "jobs.sqlite3"
