"""A real server process for the server tests: `python -m server` (what `spd serve` runs: vLLM's
OpenAI API server with this project's plugins) on 127.0.0.1, a free port, temporary store and
data dirs, the bundled model (in float32 and eager, see `command`); or, with `stock=True`, plain `python -m
vllm.entrypoints.openai.api_server` with `VLLM_PLUGINS` naming the plugins."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
PLUGINS = "spd_kv_projection,spd_api"

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
    def __init__(self, root: Path, api_key: str | None = None, extra: list[str] | None = None,
                 env: dict[str, str] | None = None, stock: bool = False):
        self.root, self.api_key, self.extra, self.env, self.stock = Path(root), api_key, extra or [], env or {}, stock
        self.store, self.data = self.root / "store", self.root / "data"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if not self.stock:
            # float32: the tests compare a request's tokens in a batch with its tokens alone, which
            # vLLM guarantees only in float32 (its bfloat16 kernels, `spd serve`'s default on CPUs
            # with BF16 instructions, change greedy tokens with the batch, plugins or not). Eager:
            # it starts in less time than the compiled default (whose tokens equal eager's in
            # float32: test_vllm_backend); test_server_entrypoints starts `spd serve`'s defaults
            def given(*flags: str) -> bool:
                return any(a.split("=")[0] in flags for a in self.extra)

            dtype = [] if given("--dtype") else ["--dtype", "float32"]
            eager = [] if given("--enforce-eager", "--no-enforce-eager", "-O", "--compilation-config") else ["--enforce-eager"]
            return [sys.executable, "-m", "server", "--port", str(self.port), *dtype, *eager, *self.extra]
        from spd_engine import models

        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(models.resolve(MODEL)),
                "--served-model-name", MODEL, "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
                "--host", "127.0.0.1", "--port", str(self.port), *self.extra]

    def start(self, timeout: float = 400) -> "Server":
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
               "SPD_STORE_DIR": str(self.store), "SPD_SERVER_DATA": str(self.data), **self.env}
        for k in ("SPD_API_KEY", "VLLM_API_KEY", "VLLM_PLUGINS"):
            env.pop(k, None)
        if self.api_key:
            env["SPD_API_KEY" if not self.stock else "VLLM_API_KEY"] = self.api_key
        if self.stock:
            env["VLLM_PLUGINS"] = PLUGINS
        self.log = open(self.root / f"server-{self.port}.log", "ab")
        # its own process group: stopping it stops vLLM's engine-core process too
        self.proc = subprocess.Popen(self.command(), cwd=self.root, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
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
        self.stop()
        raise RuntimeError(f"server did not start: {self.tail()}")

    def tail(self) -> str:
        return (self.root / f"server-{self.port}.log").read_text(errors="replace")[-4000:]

    def kill9(self) -> None:
        """SIGKILL the server process alone (as a crash would): its children must go by themselves."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # anything left in its group
            except ProcessLookupError:
                pass

    def openai_client(self):
        """The official openai client pointed at this server (with its API key, if any)."""
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none", max_retries=0, timeout=300)

    def client(self) -> httpx.Client:
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=300)


def wait_job(http: httpx.Client, job_id: str, timeout: float = 400, states=("succeeded", "failed", "cancelled")) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id} still {job['state']}")
