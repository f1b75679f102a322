"""The processes a benchmark run drives: vLLM engines in worker processes, `spd serve` (vLLM's
OpenAI server with this project's plugins) and stock vLLM's OpenAI server. Each is started on
demand, shared by the benchmarks of one run that need it, and stopped by its own PID (its process
group, which it leads: vLLM's server has an engine-core child) when no later benchmark needs it,
or at the end.

Every child runs with cwd = this worktree and PYTHONPATH = this worktree first, so it imports the
code under test (not another checkout's editable install); vLLM's spawned engine and worker
processes inherit both.

Stock arms set `VLLM_PLUGINS=none`: vLLM then loads only plugins named `none` (there is none), so
neither `spd_kv_projection` nor `spd_api` is loaded (with `VLLM_PLUGINS` unset vLLM would load every
installed general plugin, ours included).
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

from common import (BENCH, ENGINE, ENGINE_ENV, KV_CACHE_GIB, MODEL, REPO, free_port, group_cpu_by_process,
                    group_cpu_seconds, server_engine, spd_serve_vllm)

TAG = "@@bench "
NO_PLUGINS = "none"  # a VLLM_PLUGINS list naming no installed plugin


def child_env(**extra: str) -> dict[str, str]:
    """The environment of every child: this worktree first on the import path, no plugin
    selection or store inherited from the caller."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VLLM_PLUGINS", "SPD_STORE_DIR", "SPD_SERVER_DATA", "SPD_API_KEY", "VLLM_API_KEY",
                        "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND",
                        "VLLM_CPU_NUM_OF_RESERVED_CPU")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the process group led by `proc` (our child), then SIGKILL it if still there."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left in its group (engine core, workers)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


class EngineClient:
    """A vLLM engine in `bench/engine_worker.py`.

    arm "plugin": the library's VLLMBackend (the spd_kv_projection plugin loaded by vLLM; modes are
    packs saved into its store); "stock": vLLM's `LLM` with VLLM_PLUGINS=none; both in-process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0, executor `uni`: VLLMBackend's default). arm "offline":
    vLLM's `LLM` with its own process model (engine core in a process of its own), no plugin, and
    `engine` and `env` as given (the settings of the server it is compared with)."""

    def __init__(self, arm: str, logdir: Path, engine: dict | None = None, tag: str = "",
                 env: dict[str, str] | None = None):
        extra = {"VLLM_CPU_KVCACHE_SPACE": ENGINE_ENV["VLLM_CPU_KVCACHE_SPACE"], **(env or {})}
        if arm in ("plugin", "stock"):
            extra["VLLM_ENABLE_V1_MULTIPROCESSING"] = ENGINE_ENV["VLLM_ENABLE_V1_MULTIPROCESSING"]
        env = child_env(**extra)
        if arm != "plugin":
            env["VLLM_PLUGINS"] = NO_PLUGINS
        name = f"{arm}{tag}"
        self.log = open(Path(logdir) / f"engine-{name}.log", "w")  # the worker's stderr
        self.out = open(Path(logdir) / f"engine-{name}.stdout.log", "w")  # its stdout, but for replies
        cfg = {"arm": arm, "engine": engine or ENGINE}
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

    def cpu(self) -> float:
        """CPU seconds used so far by the worker and the vLLM processes it started."""
        return group_cpu_seconds(self.proc.pid)

    def call(self, op: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(60)
        except (BrokenPipeError, subprocess.TimeoutExpired, OSError):
            pass
        _stop(self.proc)
        self.log.close()
        self.out.close()


PROBE = {"model": MODEL, "prompt": "Hello", "max_tokens": 1, "temperature": 0.0}


class ServerProcess:
    """An OpenAI-compatible server child on 127.0.0.1:<free port>. Ready once a completion
    answers (`start_seconds`: from the spawn to that first answer, polled every 0.25 s)."""

    def __init__(self, name: str, cmd: list[str], env: dict, logdir: Path, timeout: float = 900.0,
                 root: Path | None = None):
        self.name, self.port = name, free_port()
        self.root = root
        self.log = open(Path(logdir) / f"server-{name}-{self.port}.log", "w")
        self.cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        self.env_shown = {k: env[k] for k in ("VLLM_PLUGINS", "VLLM_CPU_KVCACHE_SPACE", "SPD_STORE_DIR",
                                              "SPD_SERVER_DATA", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "VLLM_CPU_OMP_THREADS_BIND",
                                              "VLLM_CPU_NUM_OF_RESERVED_CPU") if k in env}
        self.url = f"http://127.0.0.1:{self.port}"
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {name} exited with code {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.post(self.url + "/v1/completions", json=PROBE, timeout=30).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"server {name} did not answer in {timeout:.0f} s; see {self.log.name}")
            time.sleep(0.25)
        self.start_seconds = time.perf_counter() - t0
        self.start_cpu_seconds = self.cpu()  # CPU work of its processes from spawn to that first answer

    def cpu(self) -> float:
        """CPU seconds used so far by the server's processes (API server, engine core, worker)."""
        return group_cpu_seconds(self.proc.pid)

    def cpu_by_process(self) -> dict[str, float]:
        """`cpu` by process name (`python`: the API server; VLLM::EngineCore; VLLM::Worker)."""
        return group_cpu_by_process(self.proc.pid)

    def describe(self) -> dict:
        return {"command": " ".join(self.cmd[1:]), "env": self.env_shown, "start_to_first_answer_seconds":
                round(self.start_seconds, 2), "start_to_first_answer_cpu_seconds": round(self.start_cpu_seconds, 2)}

    def close(self) -> None:
        _stop(self.proc)
        self.log.close()


def spd_serve_command(extra: list[str] | None = None) -> list[str]:
    """`spd serve` as a user runs it (`python -m server` = `spd serve`), with its defaults."""
    return [sys.executable, "-m", "server", "--port", "{port}", *(extra or [])]


def vllm_defaults_command() -> list[str]:
    """vLLM's OpenAI server with its own defaults: only the model, its served name and where to listen."""
    from spd_engine import models

    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(models.resolve(MODEL)),
            "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", "{port}"]


def spd_server(logdir: Path, extra: list[str] | None = None, name: str = "spd", timeout: float = 900.0,
               env: dict[str, str] | None = None) -> ServerProcess:
    """`spd serve --port P EXTRA` (with its defaults for what EXTRA does not set) on a fresh store
    and data dir; `env`: variables added to the child's environment."""
    root = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    env = child_env(SPD_STORE_DIR=str(root / "store"), SPD_SERVER_DATA=str(root / "data"), **(env or {}))
    (root / "store").mkdir()
    return ServerProcess(name, spd_serve_command(extra), env, logdir, root=root, timeout=timeout)


def vllm_server(logdir: Path, defaults: bool = False) -> ServerProcess:
    """Stock vLLM's OpenAI server, no plugin loaded: the same flags and vLLM environment settings as
    `spd serve`, or vLLM's own defaults (compiled engine, bfloat16 on x86, the model's max length)
    with VLLM_CPU_KVCACHE_SPACE set (vLLM's CPU default refuses to start on this machine)."""
    if defaults:
        cmd, env = vllm_defaults_command(), child_env(VLLM_PLUGINS=NO_PLUGINS, VLLM_CPU_KVCACHE_SPACE=KV_CACHE_GIB)
    else:
        cmd, cpu_env = spd_serve_vllm(["--port", "{port}"])
        env = child_env(VLLM_PLUGINS=NO_PLUGINS, **cpu_env)
    return ServerProcess("vllm-defaults" if defaults else "vllm", cmd, env, logdir,
                         timeout=1800.0 if defaults else 900.0)


def _offline_engine(logdir: Path) -> EngineClient:
    """vLLM's offline `LLM` with `spd serve`'s engine settings on this machine (corpus_job's baseline)."""
    engine, env = server_engine()
    return EngineClient("offline", logdir, engine=engine, env=env)


# the server with LoRA on (hot_paths: loading an adapter needs it), in float32 and eager: the soak
# compares each answer with the same request alone, which vLLM's bfloat16 kernels do not guarantee
# (the soak's record was made eager, as the tests' servers run)
LORA_FLAGS = ["--enable-lora", "--max-lora-rank", "8", "--max-loras", "2", "--dtype", "float32", "--enforce-eager"]

_FACTORIES = {
    "plugin_engine": lambda d: EngineClient("plugin", d),
    "stock_engine": lambda d: EngineClient("stock", d),
    "offline_engine": _offline_engine,
    "spd_server": spd_server,
    "spd_server_lora": lambda d: spd_server(d, LORA_FLAGS, name="spd-lora"),
    "vllm_server": vllm_server,
    "vllm_server_defaults": lambda d: vllm_server(d, defaults=True),
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
