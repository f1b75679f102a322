"""The processes a run drives and the load it puts on them: vLLM engines (bench/engine_worker.py),
`spd serve` and stock vLLM's OpenAI server (on server/harness.py, the tests' harness), each started
on first use and stopped (its process group) when no later benchmark uses it. Children import this
worktree's code; stock arms set `VLLM_PLUGINS=none` (no installed plugin): unset, vLLM loads ours."""
import asyncio
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from common import BENCH, ENGINE, KV_CACHE_GIB, MODEL, REPO, described, group_cpu_by_process, random_pack

from server.harness import ServerProcess, stock_command, stop_group, wait_job

NO_PLUGINS = "none"
PROBE = {"model": MODEL, "prompt": "Hello", "max_tokens": 1, "temperature": 0.0}
# LoRA on (hot_paths loads an adapter), float32 and eager: the soak compares each answer with the
# same request alone, which vLLM's bfloat16 kernels do not keep
LORA_FLAGS = ["--enable-lora", "--max-lora-rank", "8", "--max-loras", "2", "--dtype", "float32", "--enforce-eager"]


def spd_serve_vllm(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The vLLM command `spd serve ARGV` runs and its VLLM_* settings (but the plugin list and API
    key), from server.__main__ itself so the baselines cannot drift from it."""
    from server.__main__ import vllm_command

    cmd, env = vllm_command(argv, {})
    return cmd, {k: v for k, v in env.items() if k.startswith("VLLM_") and k not in ("VLLM_PLUGINS", "VLLM_API_KEY")}


def server_engine() -> tuple[dict, dict[str, str]]:
    """`spd serve`'s engine as `LLM` arguments and environment, with the OpenAI server's CPU
    scheduler defaults (vLLM 0.32: 128 sequences, 2048 batched tokens, where `LLM` takes 256 / 4096)
    so an offline `LLM` does the server's work."""
    cmd, env = spd_serve_vllm([])
    return {"dtype": cmd[cmd.index("--dtype") + 1], "enforce_eager": "--enforce-eager" in cmd,
            "max_model_len": int(cmd[cmd.index("--max-model-len") + 1]), "max_num_seqs": 128,
            "max_num_batched_tokens": 2048}, env


def child_env(**extra: str) -> dict[str, str]:
    """This worktree first on the import path; no plugin list, store or vLLM CPU setting inherited."""
    drop = ("VLLM_PLUGINS", "SPD_STORE_DIR", "SPD_SERVER_DATA", "SPD_API_KEY", "VLLM_API_KEY", "VLLM_ENABLE_V1_MULTIPROCESSING",
            "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))])
    return {**env, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **extra}


class EngineClient:
    """A vLLM engine in bench/engine_worker.py (its arms: see there); `call` runs one of its methods."""

    def __init__(self, arm: str, logdir: Path, engine: dict | None = None, env: dict[str, str] | None = None):
        extra = {"VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GIB, **(env or {})}
        if arm in ("plugin", "stock"):
            extra["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in the worker: the same loop in both
        if arm != "plugin":
            extra["VLLM_PLUGINS"] = NO_PLUGINS
        self.name, self.log = arm, open(Path(logdir) / f"engine-{arm}.log", "w")
        self.proc = subprocess.Popen([sys.executable, str(BENCH / "engine_worker.py"), arm, json.dumps(engine or ENGINE)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=child_env(**extra), cwd=str(REPO), start_new_session=True)
        self.state = self.call(None)  # its first reply

    def call(self, op: str | None, **kw) -> dict:
        if op:
            self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
            self.proc.stdin.flush()
        if not (line := self.proc.stdout.readline()):
            raise RuntimeError(f"the {self.name} engine worker exited (code {self.proc.wait()}); see {self.log.name}")
        if "error" in (reply := json.loads(line)):
            raise RuntimeError(f"{self.name} engine: {reply['error']}")
        return reply

    def arm(self, batch: int, max_tokens: int, caps: list[list[str]] | None = None, style: str = "chat",
            key: str | None = None):
        """An arm for `interleave`: a `run` of the batch, in the worker mode set `key` if given; in the
        warm-up round (-1) of 1 token (what loads its modes)."""
        def once(i: int) -> dict:
            if key:
                self.call("use_worker_modes", key=key)
            return self.call("run", batch=batch, max_tokens=max_tokens if i >= 0 else 1, caps=caps, style=style)
        return once

    def stop(self) -> None:
        try:
            self.proc.stdin.close()  # the worker closes its engine at the end of its input
            self.proc.wait(60)
        except (subprocess.TimeoutExpired, OSError):
            pass
        stop_group(self.proc, grace=30)
        self.log.close()


class BenchServer(ServerProcess):
    """A server child, ready at its first answer: `start_seconds` from the spawn (polled every 0.25 s),
    `start_cpu_seconds` its processes' CPU work until then."""

    def __init__(self, name: str, cmd: list[str], env: dict, logdir: Path, timeout: float = 900.0, root=None):
        super().__init__()
        self.root, self.env = root, env
        self.cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        self.launch(self.cmd, child_env(**env), REPO, Path(logdir) / f"server-{name}-{self.port}.log", timeout, PROBE, 0.25)
        self.start_cpu_seconds = self.cpu()

    def cpu(self) -> float:
        return sum(group_cpu_by_process(self.proc.pid).values())

    def describe(self) -> dict:
        return {"command": " ".join(self.cmd[1:]), "env": self.env,
                "start_to_first_answer_seconds": round(self.start_seconds, 2),
                "start_to_first_answer_cpu_seconds": round(self.start_cpu_seconds, 2)}


def spd_server(logdir: Path, extra: list[str] | None = None, name: str = "spd") -> BenchServer:
    """`spd serve --port P EXTRA` (`python -m server`, its defaults for the rest) on a fresh store."""
    (root := Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))).joinpath("store").mkdir()
    return BenchServer(name, [sys.executable, "-m", "server", "--port", "{port}", *(extra or [])],
                       {"SPD_STORE_DIR": str(root / "store"), "SPD_SERVER_DATA": str(root / "data")}, logdir, root=root)


def vllm_server(logdir: Path, defaults: bool = False) -> BenchServer:
    """Stock vLLM's OpenAI server, no plugin: `spd serve`'s flags and vLLM settings, or vLLM's own
    defaults with VLLM_CPU_KVCACHE_SPACE set (its CPU default refuses to start on this machine)."""
    cmd, env = (stock_command("{port}"), {"VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GIB}) if defaults \
        else spd_serve_vllm(["--port", "{port}"])
    return BenchServer("vllm-defaults" if defaults else "vllm", cmd, {"VLLM_PLUGINS": NO_PLUGINS, **env}, logdir,
                       timeout=1800.0 if defaults else 900.0)


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
        self.live: dict[str, object] = {}

    def get(self, *names: str):
        """The named processes (one, or a tuple), the missing ones started concurrently: an engine's
        start is mostly waiting."""
        with ThreadPoolExecutor() as pool:
            started = {n: pool.submit(FACTORIES[n], self.logdir) for n in names if n not in self.live}
        self.live.update({n: f.result() for n, f in started.items() if f.exception() is None})  # closed later
        for f in started.values():
            if f.exception() is not None:
                raise f.exception()
        return self.live[names[0]] if len(names) == 1 else tuple(self.live[n] for n in names)

    def keep_only(self, names: set[str]) -> None:
        for n in [n for n in self.live if n not in names]:
            self.live.pop(n).stop()


def job_record(client: httpx.Client, job: str, poll: float) -> dict:
    """A server job's final record once it succeeded (RuntimeError if it did not)."""
    if (j := wait_job(client, job, 7200, poll=poll))["state"] != "succeeded":
        raise RuntimeError(f"job {job} {j['state']}: {j.get('error')}")
    return j


def save_random_mode(store_dir: Path, name: str, seed: int = 0) -> dict:
    """A random pack in a server's store; one already there under that name is kept (the same seed
    made it)."""
    from spd_engine import models
    from spd_engine.subspace import Store

    pack = random_pack(models.info(models.resolve(MODEL)), name, seed=seed)
    if name not in Store(store_dir).names():
        Store(store_dir).save(pack)
    return {"name": name, **described(pack)}


@functools.cache
def short_prompts() -> tuple[str, ...]:
    """The first sentence of every GSM8K question (distinct, 10-30 tokens)."""
    from spd_engine.data import load_examples, resolve_data

    firsts = (e.prompt.split(". ")[0].strip() for e in load_examples(resolve_data("gsm8k"), "math"))
    return tuple(s if s.endswith((".", "?")) else s + "." for s in firsts)


def load(srv: BenchServer, prompts, concurrency: int, max_tokens: int, extra: dict | None = None) -> dict:
    """Closed-loop clients: `concurrency` of them send the prompts as greedy /v1/completions of
    exactly `max_tokens` tokens (ignore_eos), each its next prompt once its last answered; with the
    CPU seconds the server's processes used meanwhile, in all and by process."""
    async def clients() -> tuple[float, list[float], int]:
        todo, latencies, tokens = iter(prompts), [], []
        limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
        async with httpx.AsyncClient(base_url=srv.url, timeout=900, limits=limits) as client:
            async def user():
                for prompt in todo:  # shared: each client takes the next prompt not yet sent
                    t0 = time.perf_counter()
                    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens,
                                                                   "temperature": 0.0, "ignore_eos": True, **(extra or {})})
                    latencies.append(time.perf_counter() - t0)
                    tokens.append(r.raise_for_status().json()["usage"]["completion_tokens"])

            t0 = time.perf_counter()
            await asyncio.gather(*(user() for _ in range(concurrency)))
            return time.perf_counter() - t0, latencies, sum(tokens)

    c0 = group_cpu_by_process(srv.proc.pid)
    wall, latencies, tokens = asyncio.run(clients())
    c1 = group_cpu_by_process(srv.proc.pid)
    cpu = sum(c1.values()) - sum(c0.values())
    return {"requests": len(prompts), "seconds": wall, "req_s": len(prompts) / wall, "tok_s": tokens / wall,
            "tokens": tokens, "latencies": latencies, "cpu_seconds_by_process": {k: round(v - c0.get(k, 0.0), 2)
                                                                                for k, v in c1.items()},
            "cpu_seconds": cpu, "tok_per_cpu_s": tokens / max(cpu, 1e-9)}


def settle(servers) -> float:
    """Wait (at most 30 s) until the servers together use under 5% of a core over half a second;
    the seconds waited. A server stays busy for 1.5-2 s after a burst, which would otherwise be
    charged to whichever server runs next."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 30:
        c0 = sum(s.cpu() for s in servers)
        time.sleep(0.5)
        if sum(s.cpu() for s in servers) - c0 < 0.05 * 0.5:
            break
    return time.perf_counter() - t0


def rotated_rounds(targets: dict, rounds: int, levels: dict[int, int], max_tokens: int) -> dict:
    """Rounds of `load` on every target (name: (server, extra body)) at each level (concurrency:
    requests), each run once the servers are idle, each round and level on prompts of its own, the
    order rotating so no arm always runs right after another; by target, then level."""
    prompts_all, items = short_prompts(), list(targets.items())
    servers = list({id(s): s for s, _ in targets.values()}.values())
    runs = {name: {str(c): [] for c in levels} for name in targets}
    for rnd in range(rounds):
        for c, n in levels.items():
            prompts = [prompts_all[(rnd * 41 + c * 7 + j) % len(prompts_all)] for j in range(n)]
            for name, (srv, extra) in items[rnd % len(items):] + items[:rnd % len(items)]:
                waited = settle(servers)
                runs[name][str(c)].append({**load(srv, prompts, c, max_tokens, extra), "settle_seconds": waited})
    return runs


def latency(runs: list[dict]) -> dict[str, float]:
    xs = [v for x in runs for v in x["latencies"]]  # "inclusive": linear between the order statistics
    return {"p50": statistics.median(xs), "p99": statistics.quantiles(xs, n=100, method="inclusive")[98],
            "mean": statistics.fmean(xs)}


def prepared(targets: dict, mode: str, warm: int) -> tuple[dict, dict]:
    """Before `rotated_rounds` on targets["spd"] against a stock server: `mode` saved in the spd
    server's store; the same greedy 24-token completion from it without a mode, in `mode` and from
    the stock server (the mode must change the text, no mode must give vLLM's); then `warm` short
    requests to every target (kernels, caches, the mode's first load)."""
    spd = targets["spd"][0]
    stock = next(s for s, _ in targets.values() if s is not spd)
    info = save_random_mode(spd.root / "store", mode)

    def text(url: str, extra: dict | None = None) -> str:
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": short_prompts()[0], "max_tokens": 24,
                                                      "temperature": 0.0, **(extra or {})}, timeout=300)
        return r.raise_for_status().json()["choices"][0]["text"]

    out = {"prompt": short_prompts()[0], "spd": text(spd.url), "vllm": text(stock.url),
           "spd_mode": text(spd.url, {"capability": mode})}
    for srv, extra in targets.values():
        load(srv, short_prompts()[:warm], warm, 4, extra)
    return info, {**out, "no_mode_equals_vllm": out["spd"] == out["vllm"], "mode_changes_output": out["spd_mode"] != out["spd"]}
