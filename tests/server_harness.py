"""A real SPD server process for the server tests: `python -m server` under uvicorn on 127.0.0.1,
a free port, temporary store and data dirs, the bundled model and the transformers backend (or
`backend="vllm"`)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"

CALIBRATION = "\n".join([
    '{"id": "a", "prompt": "What is 2+3?", "answer": "2+3 = 5. The answer is 5"}',
    '{"id": "b", "prompt": "What is 4+4?", "answer": "4+4 = 8. The answer is 8"}',
    '{"id": "c", "prompt": "What is 7-2?", "answer": "7-2 = 5. The answer is 5"}',
]) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, root: Path, api_key: str | None = None, extra: list[str] | None = None, backend: str = "hf"):
        self.root, self.api_key, self.extra, self.backend = Path(root), api_key, extra or [], backend
        self.store, self.data = self.root / "store", self.root / "data"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> "Server":
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        env.pop("SPD_API_KEY", None)
        cmd = [sys.executable, "-m", "server", "--backend", self.backend, "--model", MODEL, "--port", str(self.port),
               "--store", str(self.store), "--data-dir", str(self.data), "--batch-window-ms", "20", *self.extra]
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        self.log = open(self.root / f"server-{self.port}.log", "ab")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server did not start: {self.tail()}")

    def tail(self) -> str:
        return (self.root / f"server-{self.port}.log").read_text(errors="replace")[-3000:]

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def openai_client(self):
        """The official openai client pointed at this server (with its API key, if any)."""
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none", max_retries=0, timeout=300)

    def client(self) -> httpx.Client:
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=300)


def wait_job(http: httpx.Client, job_id: str, timeout: float = 300, states=("succeeded", "failed", "cancelled")) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id} still {job['state']}")


def batch_stats(http: httpx.Client) -> tuple[float, float]:
    """The server's batch-size histogram: (backend calls, requests in them)."""
    text = http.get("/metrics").text
    val = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("spd_batch_size_")}
    return val["spd_batch_size_count"], val["spd_batch_size_sum"]


def assert_concurrent_like_alone(http: httpx.Client, ask, work: list, alone: dict) -> None:
    """Sent all at once, every request in `work` gets the answer it got alone (`alone[request]`), and the
    server served them in few backend calls (they were batched, not queued one by one)."""
    before = batch_stats(http)
    with ThreadPoolExecutor(len(work)) as pool:
        together = list(pool.map(ask, work))
    for c, text in zip(work, together):
        assert text == alone[c], f"{c} differs when batched"
    count, total = (a - b for a, b in zip(batch_stats(http), before))
    assert total == len(work) and count < len(work) / 4, f"{len(work)} requests took {count} backend calls"
