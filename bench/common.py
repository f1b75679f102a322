"""What every benchmark shares: the registry, interleaved repetitions, ratios with their spread,
goals, a process group's CPU time and memory. Every figure is a ratio against a baseline measured in
the same run, the arms interleaved (A B A B ...) so drift in the machine's load hits both alike;
each repetition gives one ratio."""
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
MODEL = "smollm2-135m"
if str(REPO) not in sys.path:  # this worktree's code, not another checkout's install
    sys.path.insert(0, str(REPO))

# The suite in run order, each with its row number in the results table. Transformers-only ones
# first, then those sharing vLLM engines, then the servers, vLLM's compiled server last.
SUITE = {"hooked_generation": 4, "calibration": 5, "projection_overhead": 1, "many_modes": 11, "corpus_job": 6,
         "server_overhead": 7, "hot_paths": 8, "soak": 13, "server_defaults": 9,
         "lora_no_adapter": 18}

# The engine-level arms: VLLMBackend's defaults (eager, float32, in-process `uni` executor, prefix
# caching), 64 sequences, LoRA off. The servers run `spd serve`'s own.
KV_CACHE_GIB = "2"
ENGINE = {"dtype": "float32", "enforce_eager": True, "max_model_len": 2048, "max_num_seqs": 64,
          "enable_prefix_caching": True, "seed": 0}


def random_pack(info, name: str, **cfg):
    """A random pack, rank d/2 at the paper's layers unless told: a projection's cost does not
    depend on its basis."""
    from spd_engine.calibrate import CalibrationConfig, calibrate

    return calibrate(None, None, info, "math", [], name, CalibrationConfig(method="random", **cfg))


def described(pack) -> dict:
    m = pack.manifest
    return {"rank": max(r for rs in m.ranks.values() for r in rs), "layers": m.layers, "kinds": list(m.kinds),
            "basis": "random (cost only)"}


def hf_tok_s(be, prompts: list[list[int]], capability: tuple[str, ...], max_tokens: int) -> float:
    """Greedy tokens/s of the transformers backend, every row in `capability`, EOS ignored so every
    arm does the same work (generate returns host lists: a device has finished)."""
    from spd_engine.backend import GenerationRequest

    reqs = [GenerationRequest(p, capability=capability, max_tokens=max_tokens, ignore_eos=True) for p in prompts]
    t = time.perf_counter()
    return sum(len(o.token_ids) for o in be.generate(reqs)) / (time.perf_counter() - t)


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def ratios(num: list[float], den: list[float]) -> dict:
    """Per-repetition ratios num_i / den_i (arms of the same repetition are neighbours in time)."""
    return spread([a / b for a, b in zip(num, den)])


def per_arm(runs: dict[str, list[dict]]) -> dict:
    """Every repetition's tokens/s and tokens per CPU-second, by arm."""
    return {k: {arm: [x[k] for x in v] for arm, v in runs.items()} for k in ("tok_s", "tok_per_cpu_s")}


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


def compared(key: str, label: str, num: list[dict], den: list[dict], goal: Goal | None = None) -> tuple[dict, dict]:
    """`run_ratios` as result fields `key` and `key`_cpu, and as a headline row."""
    r, cpu = run_ratios(num, den)
    return {key: r, f"{key}_cpu": cpu}, headline(label, r, goal, cpu=cpu)


@dataclass
class Context:
    quick: bool
    out: Path
    notes: list[str] = field(default_factory=list)
    resources: object = None  # procs.Resources, shared by the benchmarks of one run

    def size(self, quick, full):
        return quick if self.quick else full


def _group(pgid: int):
    """(command name, /proc/<pid>/stat from field 3 on) of every live process in group `pgid`."""
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        if int((fields := stat[stat.rindex(")") + 2:].split())[2]) == pgid:  # field 5: pgrp
            yield stat[stat.index("(") + 1:stat.rindex(")")], fields


def group_cpu_by_process(pgid: int) -> dict[str, float]:
    """CPU seconds (user + system, all threads) of group `pgid`'s live processes by command name:
    every engine and server of the suite leads its own group."""
    out: dict[str, float] = {}
    for comm, f in _group(pgid):  # fields 14, 15: utime, stime
        out[comm] = out.get(comm, 0.0) + (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    return out


def group_rss_mib(pgid: int) -> float:
    return sum(int(f[21]) for _, f in _group(pgid)) * os.sysconf("SC_PAGE_SIZE") / 2**20  # field 24: rss, in pages
