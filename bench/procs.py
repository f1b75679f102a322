"""The processes a benchmark run drives: vLLM engines in worker processes, our server, vLLM's
OpenAI server. Each is started on demand, shared by the benchmarks of one run that need it, and
stopped by its own PID (its process group, which it leads: vLLM's server has an engine-core
child) when no later benchmark needs it, or at the end.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from common import BENCH, ENGINE, ENGINE_ENV, MODEL, REPO, free_port

TAG = "@@bench "


def _stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the process group led by `proc` (our child), then SIGKILL it if still there."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


class EngineClient:
    """A vLLM engine in `bench/engine_worker.py`: arm "plugin" (VLLMBackend) or "stock"."""

    def __init__(self, arm: str, logdir: Path):
        env = {**os.environ, **ENGINE_ENV, "TOKENIZERS_PARALLELISM": "false"}
        if arm == "stock":
            env["VLLM_PLUGINS"] = ""  # vLLM loads no plugin at all (vllm/plugins/__init__.py)
        else:
            env.pop("VLLM_PLUGINS", None)
        self.store = tempfile.mkdtemp(prefix=f"bench-store-{arm}-")
        self.log = open(Path(logdir) / f"engine-{arm}.log", "w")  # the worker's stderr
        self.out = open(Path(logdir) / f"engine-{arm}.stdout.log", "w")  # its stdout, but for replies
        cfg = {"arm": arm, "engine": ENGINE, "store": self.store}
        self.proc = subprocess.Popen([sys.executable, str(BENCH / "engine_worker.py"), json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, cwd=str(REPO), start_new_session=True)
        self.arm = arm
        self.state = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(TAG):
                msg = json.loads(line[len(TAG):])
                if msg.get("ok") is False:
                    raise RuntimeError(f"{self.arm} engine: {msg['error']}\n{msg.get('trace', '')}")
                return msg
            self.out.write(line)
        raise RuntimeError(f"the {self.arm} engine worker exited (code {self.proc.wait()}); see {self.log.name}")

    def call(self, op: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(30)
        except (BrokenPipeError, subprocess.TimeoutExpired, OSError):
            pass
        _stop(self.proc)
        self.log.close()
        self.out.close()


class ServerProcess:
    """An HTTP server child on 127.0.0.1:<free port>, ready once its /health answers 200."""

    def __init__(self, name: str, cmd: list[str], env: dict, logdir: Path, timeout: float = 900.0):
        self.name, self.port = name, free_port()
        self.log = open(Path(logdir) / f"server-{name}.log", "w")
        cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
                                     start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {name} exited with code {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                _stop(self.proc)
                raise RuntimeError(f"server {name} did not become ready in {timeout:.0f} s; see {self.log.name}")
            time.sleep(1.0)
        self.start_seconds = time.perf_counter() - t0

    def close(self) -> None:
        _stop(self.proc)
        self.log.close()


def spd_server(logdir: Path) -> ServerProcess:
    """Our server, `--backend vllm` (VLLMBackend defaults = ENGINE, LoRA slots on; the engine core in its
    own process, the server's default)."""
    root = Path(tempfile.mkdtemp(prefix="bench-spd-server-"))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": ENGINE_ENV["VLLM_CPU_KVCACHE_SPACE"], "TOKENIZERS_PARALLELISM": "false"}
    env.pop("VLLM_PLUGINS", None)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    srv = ServerProcess("spd", [sys.executable, "-m", "spd_engine.cli", "serve", "--port", "{port}",
                                "--store", str(root / "store"), "--data-dir", str(root / "data"),
                                "--backend", "vllm", "--log-level", "WARNING"], env, logdir)
    srv.root = root
    return srv


def vllm_server(logdir: Path) -> ServerProcess:
    """vLLM's own OpenAI server on the same engine settings, with no plugin loaded."""
    from spd_engine import models

    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": ENGINE_ENV["VLLM_CPU_KVCACHE_SPACE"], "VLLM_PLUGINS": "",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(models.resolve(MODEL)),
           "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", "{port}", "--dtype", ENGINE["dtype"],
           "--max-model-len", str(ENGINE["max_model_len"]), "--max-num-seqs", str(ENGINE["max_num_seqs"]),
           "--seed", str(ENGINE["seed"]), "--enable-prefix-caching", "--disable-log-stats"]
    if ENGINE["enforce_eager"]:
        cmd.append("--enforce-eager")
    return ServerProcess("vllm", cmd, env, logdir)


_FACTORIES = {
    "plugin_engine": lambda d: EngineClient("plugin", d),
    "stock_engine": lambda d: EngineClient("stock", d),
    "spd_server": spd_server,
    "vllm_server": vllm_server,
}


class Resources:
    """Processes shared by the benchmarks of one run, started on first use (several at once with
    `start`), closed when no remaining benchmark uses them (`keep_only`) or at the end."""

    def __init__(self, logdir: Path):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.live: dict[str, object] = {}

    def start(self, *names: str) -> None:
        """Start the missing ones concurrently (engine start-up is mostly waiting on one core)."""
        missing = [n for n in names if n not in self.live]
        errors: list[BaseException] = []

        def boot(n: str) -> None:
            try:
                self.live[n] = _FACTORIES[n](self.logdir)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        threads = [threading.Thread(target=boot, args=(n,)) for n in missing]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def get(self, name: str):
        self.start(name)
        return self.live[name]

    def keep_only(self, names: set[str]) -> None:
        for n in [n for n in self.live if n not in names]:
            self.live.pop(n).close()

    def close(self) -> None:
        self.keep_only(set())
