"""The processes a run drives and the load it puts on them: vLLM engines in worker processes
(bench/engine_worker.py), `spd serve` and stock vLLM's OpenAI server (server/harness.py, the tests'
harness). Each starts on first use, is shared by the benchmarks that need it, and is stopped (its
process group) when no later one does.

Children run with cwd and PYTHONPATH this worktree, so they import the code under test, not
another checkout's install. Stock arms set `VLLM_PLUGINS=none` (a list naming no installed
plugin): unset, vLLM would load ours too.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from common import (BENCH, ENGINE, KV_CACHE_GIB, MODEL, REPO, group_cpu_by_process, group_cpu_seconds, random_pack,
                    server_engine, spd_serve_vllm)

from server.harness import ServerProcess, stop_group

TAG = "@@bench "
NO_PLUGINS = "none"
PROBE = {"model": MODEL, "prompt": "Hello", "max_tokens": 1, "temperature": 0.0}
# LoRA on (hot_paths loads an adapter), float32 and eager: the soak compares each answer with the
# same request alone, which vLLM's bfloat16 kernels do not keep
LORA_FLAGS = ["--enable-lora", "--max-lora-rank", "8", "--max-loras", "2", "--dtype", "float32", "--enforce-eager"]


def child_env(**extra: str) -> dict[str, str]:
    """This worktree first on the import path; no plugin list, store or vLLM CPU setting inherited."""
    drop = ("VLLM_PLUGINS", "SPD_STORE_DIR", "SPD_SERVER_DATA", "SPD_API_KEY", "VLLM_API_KEY",
            "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND",
            "VLLM_CPU_NUM_OF_RESERVED_CPU")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
    return {**env, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **extra}


class EngineClient:
    """A vLLM engine in bench/engine_worker.py (its arms: see there), one JSON command per line."""

    def __init__(self, arm: str, logdir: Path, engine: dict | None = None, env: dict[str, str] | None = None):
        extra = {"VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GIB, **(env or {})}
        if arm in ("plugin", "stock"):
            extra["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in the worker: the same loop in both
        if arm != "plugin":
            extra["VLLM_PLUGINS"] = NO_PLUGINS
        self.arm, self.log = arm, open(Path(logdir) / f"engine-{arm}.log", "w")
        self.out = open(Path(logdir) / f"engine-{arm}.stdout.log", "w")  # vLLM's stdout, but for replies
        cfg = json.dumps({"arm": arm, "engine": engine or ENGINE})
        self.proc = subprocess.Popen([sys.executable, str(BENCH / "engine_worker.py"), cfg], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=child_env(**extra),
                                     cwd=str(REPO), start_new_session=True)
        self.state = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if not line.startswith(TAG):
                self.out.write(line)
                continue
            msg = json.loads(line[len(TAG):])
            if msg.get("ok") is False:
                raise RuntimeError(f"{self.arm} engine: {msg['error']}\n{msg.get('trace', '')}")
            return msg
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
                self.proc.wait(60)
        except (BrokenPipeError, subprocess.TimeoutExpired, OSError):
            pass
        stop_group(self.proc, grace=30)
        self.log.close()
        self.out.close()


class BenchServer(ServerProcess):
    """A server child, ready at its first answer: `start_seconds` from the spawn (polled every
    0.25 s), `start_cpu_seconds` its processes' CPU work until then."""

    SHOWN = ("VLLM_PLUGINS", "VLLM_CPU_KVCACHE_SPACE", "SPD_STORE_DIR", "SPD_SERVER_DATA", "OMP_NUM_THREADS",
             "OMP_WAIT_POLICY", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")

    def __init__(self, name: str, cmd: list[str], env: dict, logdir: Path, timeout: float = 900.0,
                 root: Path | None = None):
        super().__init__()
        self.name, self.root, self.env_shown = name, root, {k: env[k] for k in self.SHOWN if k in env}
        self.cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        self.launch(self.cmd, env, REPO, Path(logdir) / f"server-{name}-{self.port}.log", timeout, PROBE, 0.25)
        self.start_cpu_seconds = self.cpu()

    def cpu(self) -> float:
        return group_cpu_seconds(self.proc.pid)

    def describe(self) -> dict:
        return {"command": " ".join(self.cmd[1:]), "env": self.env_shown,
                "start_to_first_answer_seconds": round(self.start_seconds, 2),
                "start_to_first_answer_cpu_seconds": round(self.start_cpu_seconds, 2)}

    close = ServerProcess.stop


def spd_server(logdir: Path, extra: list[str] | None = None, name: str = "spd") -> BenchServer:
    """`spd serve --port P EXTRA` (`python -m server`, its defaults for the rest) on a fresh store."""
    root = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    (root / "store").mkdir()
    env = child_env(SPD_STORE_DIR=str(root / "store"), SPD_SERVER_DATA=str(root / "data"))
    return BenchServer(name, [sys.executable, "-m", "server", "--port", "{port}", *(extra or [])], env, logdir, root=root)


def vllm_server(logdir: Path, defaults: bool = False) -> BenchServer:
    """Stock vLLM's OpenAI server, no plugin: `spd serve`'s flags and vLLM settings, or vLLM's own
    defaults with VLLM_CPU_KVCACHE_SPACE set (its CPU default refuses to start on this machine)."""
    if defaults:
        from spd_engine import models

        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(models.resolve(MODEL)),
               "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", "{port}"]
        env = child_env(VLLM_PLUGINS=NO_PLUGINS, VLLM_CPU_KVCACHE_SPACE=KV_CACHE_GIB)
    else:
        cmd, cpu_env = spd_serve_vllm(["--port", "{port}"])
        env = child_env(VLLM_PLUGINS=NO_PLUGINS, **cpu_env)
    return BenchServer("vllm-defaults" if defaults else "vllm", cmd, env, logdir, timeout=1800.0 if defaults else 900.0)


FACTORIES = {
    "plugin_engine": lambda d: EngineClient("plugin", d),
    "stock_engine": lambda d: EngineClient("stock", d),
    "offline_engine": lambda d: EngineClient("offline", d, *server_engine()),  # corpus_job's baseline
    "spd_server": spd_server,
    "spd_server_lora": lambda d: spd_server(d, LORA_FLAGS, name="spd-lora"),
    "vllm_server": vllm_server,
    "vllm_server_defaults": lambda d: vllm_server(d, defaults=True),
}


class Resources:
    """The processes of one run, started on first use, closed when no later benchmark uses them."""

    def __init__(self, logdir: Path):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.live: dict[str, object] = {}

    def start(self, *names: str) -> None:
        """Start the missing ones concurrently (an engine's start is mostly waiting on one core)."""
        with ThreadPoolExecutor() as pool:
            started = {n: pool.submit(FACTORIES[n], self.logdir) for n in names if n not in self.live}
        self.live.update({n: f.result() for n, f in started.items() if f.exception() is None})  # closed later
        for f in started.values():
            if f.exception() is not None:
                raise f.exception()

    def get(self, *names: str):
        """The named processes (started if need be): one, or a tuple of several."""
        self.start(*names)
        return self.live[names[0]] if len(names) == 1 else tuple(self.live[n] for n in names)

    def keep_only(self, names: set[str]) -> None:
        for n in [n for n in self.live if n not in names]:
            self.live.pop(n).close()

    def close(self) -> None:
        self.keep_only(set())


# ---------------------------------------------------------------- load on a server


def short_prompts() -> list[str]:
    """The first sentence of every GSM8K question (distinct, 10-30 tokens)."""
    from spd_engine.data import load_examples, resolve_data

    firsts = (e.prompt.split(". ")[0].strip() for e in load_examples(resolve_data("gsm8k"), "math"))
    return [s if s.endswith((".", "?")) else s + "." for s in firsts]


def latency(runs: list[dict]) -> dict[str, float]:
    xs = [v for x in runs for v in x["latencies"]]  # "inclusive": linear between the order statistics
    return {"p50": statistics.median(xs), "p99": statistics.quantiles(xs, n=100, method="inclusive")[98],
            "mean": statistics.fmean(xs)}


async def load(url: str, prompts: list[str], concurrency: int, max_tokens: int, extra: dict | None = None) -> dict:
    """Closed-loop clients: `concurrency` of them send the prompts as greedy /v1/completions of
    exactly `max_tokens` tokens (ignore_eos), each its next prompt once its last answered."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    latencies, tokens = [], 0
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:
        async def user():
            nonlocal tokens
            while not queue.empty():
                body = {"model": MODEL, "prompt": queue.get_nowait(), "max_tokens": max_tokens, "temperature": 0.0,
                        "ignore_eos": True, **(extra or {})}
                t0 = time.perf_counter()
                r = await client.post("/v1/completions", json=body)
                latencies.append(time.perf_counter() - t0)
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"requests": len(prompts), "seconds": wall, "req_s": len(prompts) / wall, "tok_s": tokens / wall,
            "tokens": tokens, "latencies": latencies}


def measured(srv: BenchServer, prompts: list[str], concurrency: int, max_tokens: int, extra: dict | None = None) -> dict:
    """`load` on a server, with the CPU seconds its processes used meanwhile, in all and by process."""
    c0 = group_cpu_by_process(srv.proc.pid)
    out = asyncio.run(load(srv.url, prompts, concurrency, max_tokens, extra))
    c1 = group_cpu_by_process(srv.proc.pid)
    out["cpu_seconds_by_process"] = {k: round(v - c0.get(k, 0.0), 2) for k, v in c1.items()}
    out["cpu_seconds"] = sum(c1.values()) - sum(c0.values())
    out["tok_per_cpu_s"] = out["tokens"] / max(out["cpu_seconds"], 1e-9)
    return out


def settle(servers, idle_share: float = 0.05, interval: float = 0.5, limit: float = 30.0) -> float:
    """Wait (at most `limit` s) until the servers together use under `idle_share` of a core over
    `interval` s; the seconds waited. A server stays busy for 1.5-2 s after a burst, which would
    otherwise be charged to whichever server runs next."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit:
        c0 = sum(s.cpu() for s in servers)
        time.sleep(interval)
        if sum(s.cpu() for s in servers) - c0 < idle_share * interval:
            break
    return time.perf_counter() - t0


def rotated_rounds(targets: dict, servers: list, rounds: int, levels: dict[int, int], max_tokens: int) -> dict:
    """Rounds of `measured` on every target (name: (server, extra body)) at each concurrency level
    (concurrency: requests), each run once all `servers` are idle, each round and level its own
    prompts; the order rotates round by round so no arm always runs right after another. Runs by
    target, then level."""
    prompts_all, items = short_prompts(), list(targets.items())
    runs = {name: {str(c): [] for c in levels} for name in targets}
    for rnd in range(rounds):
        for c, n in levels.items():
            prompts = [prompts_all[(rnd * 41 + c * 7 + j) % len(prompts_all)] for j in range(n)]
            for name, (srv, extra) in items[rnd % len(items):] + items[:rnd % len(items)]:
                waited = settle(servers)
                runs[name][str(c)].append({**measured(srv, prompts, c, max_tokens, extra), "settle_seconds": waited})
    return runs


def warm_up(targets, n: int, max_tokens: int = 4) -> None:
    """`n` short requests to every (server, extra body): kernels, caches, a mode's first load."""
    for srv, extra in targets:
        asyncio.run(load(srv.url, short_prompts()[:n], n, max_tokens, extra))


def wait_job(client: httpx.Client, job: str, poll: float) -> dict:
    """Poll a server's job until it ends: its final record, or RuntimeError if it did not succeed."""
    while (j := client.get(f"/v1/jobs/{job}").json())["state"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(poll)
    if j["state"] != "succeeded":
        raise RuntimeError(f"job {job} {j['state']}: {j.get('error')}")
    return j


def save_random_mode(store_dir: Path, name: str, seed: int = 0) -> dict:
    """A random rank-d/2 pack at the paper's layers in a server's store (the next request can name
    it); one already there under that name is kept (the same seed made it)."""
    from spd_engine import models
    from spd_engine.subspace import Store

    info = models.info(models.resolve(MODEL))
    pack = random_pack(info, name, seed=seed)
    if name not in Store(store_dir).names():
        Store(store_dir).save(pack)
    return {"name": name, "rank": info.kv_width // 2, "layers": pack.manifest.layers, "kinds": ["k", "v"],
            "basis": "random"}


def mode_check(spd_url: str, vllm_url: str, prompt: str, mode: str) -> dict:
    """The same greedy 24-token completion from spd serve without a mode, in `mode`, and from vllm
    serve: the mode must change the text, no mode must give vLLM's."""
    def text(url: str, extra: dict | None = None) -> str:
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 24,
                                                      "temperature": 0.0, **(extra or {})}, timeout=300)
        r.raise_for_status()
        return r.json()["choices"][0]["text"]

    out = {"prompt": prompt, "spd": text(spd_url), "vllm": text(vllm_url), "spd_mode": text(spd_url, {"capability": mode})}
    return {**out, "no_mode_equals_vllm": out["spd"] == out["vllm"], "mode_changes_output": out["spd_mode"] != out["spd"]}
