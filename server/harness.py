"""Server processes for the tests and the benchmarks (in the spirit of vLLM's RemoteOpenAIServer test
helper): a server child on 127.0.0.1 at a free port, in a process group of its own (stopping it
stops vLLM's engine-core and worker processes too), ready once it answers; `Server` is the tests'
`python -m server` (what `spd serve` runs: vLLM's OpenAI API server with this project's plugins) on
temporary store and data dirs, or with `stock=True` plain vLLM's server with `VLLM_PLUGINS` naming
the plugins. Nothing in the library or the served code imports this module."""
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


def stop_group(proc: subprocess.Popen, grace: float = 60.0) -> None:
    """SIGTERM `proc` (a child leading its own process group), SIGKILL it after `grace` seconds,
    then SIGKILL whatever is left in its group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class ServerProcess:
    """An OpenAI-compatible server child; `launch` starts it and waits until it is ready."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self, cmd: list[str], env: dict[str, str], cwd: Path, log: Path, timeout: float,
               probe: dict | None = None, poll: float = 0.5) -> "ServerProcess":
        """Spawn `cmd`; ready once GET /health answers 200, or with `probe` once POST
        /v1/completions of that body does (the first answer: `start_seconds` from the spawn)."""
        self.log_path = Path(log)
        self.log = open(self.log_path, "ab")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.tail()}")
            try:
                r = (httpx.get(f"{self.url}/health", timeout=2) if probe is None
                     else httpx.post(f"{self.url}/v1/completions", json=probe, timeout=30))
                if r.status_code == 200:
                    self.start_seconds = time.perf_counter() - t0
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(poll)
        self.stop()
        raise RuntimeError(f"server did not start: {self.tail()}")

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill9(self) -> None:
        """SIGKILL the server process alone (as a crash would): its children must go by themselves."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc:
            stop_group(self.proc)
            self.log.close()


class Server(ServerProcess):
    """The tests' server: `python -m server` (or stock vLLM's with `stock=True`) with its store and
    data dirs under `root`, its log there too, the environment of this process but for the API key
    and plugin selection."""

    def __init__(self, root: Path, api_key: str | None = None, extra: list[str] | None = None,
                 env: dict[str, str] | None = None, stock: bool = False):
        super().__init__()
        self.root, self.api_key, self.extra, self.env, self.stock = Path(root), api_key, extra or [], env or {}, stock
        self.store, self.data = self.root / "store", self.root / "data"

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
        return stock_command(self.port, "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", *self.extra)

    def start(self, timeout: float = 400) -> "Server":
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
               "SPD_STORE_DIR": str(self.store), "SPD_SERVER_DATA": str(self.data), **self.env}
        for k in ("SPD_API_KEY", "VLLM_API_KEY", "VLLM_PLUGINS"):
            env.pop(k, None)
        if self.api_key:
            env["SPD_API_KEY" if not self.stock else "VLLM_API_KEY"] = self.api_key
        if self.stock:
            env["VLLM_PLUGINS"] = PLUGINS
        return self.launch(self.command(), env, self.root, self.root / f"server-{self.port}.log", timeout)

    def openai_client(self):
        """The official openai client pointed at this server (with its API key, if any)."""
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "none", max_retries=0, timeout=300)

    def client(self) -> httpx.Client:
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=300)


def stock_command(port: int | str, *flags: str) -> list[str]:
    """Plain vLLM's OpenAI server on the bundled model at 127.0.0.1:`port`, vLLM's defaults but `flags`."""
    from spd_engine import models

    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(models.resolve(MODEL)),
            "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port), *flags]


def wait_job(http: httpx.Client, job_id: str, timeout: float = 400, states=("succeeded", "failed", "cancelled"),
             poll: float = 0.3) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(poll)
    raise TimeoutError(f"job {job_id} still {job['state']}")


def write_random_lora(model_path: Path, out: Path, seed: int = 0, scale: float = 0.2) -> Path:
    """A PEFT LoRA adapter (q/k/v/o, r 8, alpha 8) on the model at `model_path`, saved at `out`, with
    random A and nonzero B, so it visibly changes the model's output."""
    import torch
    from peft import LoraConfig, get_peft_model

    from spd_engine import models

    model, _ = models.load(model_path)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            # A too: peft draws it from the global generator, which earlier tests in the process move
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    peft.save_pretrained(out)
    return out
