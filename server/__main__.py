"""`spd serve` / `python -m server`: vLLM's OpenAI API server with this project's two plugins.

It runs exactly what `vllm serve` runs (`python -m vllm.entrypoints.openai.api_server`, the same
process model), with `VLLM_PLUGINS` naming `spd_kv_projection` (K/V projection, engine side) and
`spd_api` (subspace, job and adapter routes, capability fields). Every vLLM flag passes through;
this project's defaults apply only to what the user did not set:

  --model           the bundled SmolLM2-135M-Instruct (served as `smollm2-135m`); a bundled name
                    given to --model is resolved to its converted directory
  --host            127.0.0.1 (vLLM's default listens on every interface)
  --dtype           float32 on a machine without a GPU (bf16 is slower on these CPUs)
  --enforce-eager   on a machine without a GPU: the compiled engine recompiles at every start
                    here (3-4 minutes) for no measured throughput gain at this model size
  --max-model-len   2048
  VLLM_CPU_KVCACHE_SPACE  2 (GiB; vLLM's CPU default refuses to start on small machines)

This project's own settings are environment variables, so plain
`VLLM_PLUGINS=spd_kv_projection,spd_api vllm serve MODEL` reads the same ones:
SPD_STORE_DIR (subspace store), SPD_SERVER_DATA (jobs, artifacts, adapters), SPD_API_KEY (copied
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


def vllm_command(argv: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """The vLLM server command line and environment for `spd serve ARGV`."""
    from spd_engine import models

    argv, env = list(argv), dict(env)
    model = _value(argv, "--model")
    if model is None:
        argv += ["--model", str(models.resolve(models.DEFAULT_MODEL))]
        if not _given(argv, "--served-model-name"):
            argv += ["--served-model-name", models.DEFAULT_MODEL]
    elif model in models.BUNDLED:
        i = argv.index(model)
        argv[i] = str(models.resolve(model))
        if not _given(argv, "--served-model-name"):
            argv += ["--served-model-name", model]
    if not _given(argv, "--host"):
        argv += ["--host", "127.0.0.1"]
    if not _given(argv, "--max-model-len"):
        argv += ["--max-model-len", "2048"]
    if _on_cpu():
        if not _given(argv, "--dtype"):
            argv += ["--dtype", "float32"]
        if not _given(argv, "--enforce-eager", "--no-enforce-eager", "-O", "--compilation-config"):
            argv += ["--enforce-eager"]
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    listed = [p for p in env.get("VLLM_PLUGINS", "").split(",") if p]
    if "VLLM_PLUGINS" in env and listed:
        env["VLLM_PLUGINS"] = ",".join(dict.fromkeys([*listed, *PLUGINS]))
    else:
        env["VLLM_PLUGINS"] = ",".join(PLUGINS)
    if env.get("SPD_API_KEY") and not env.get("VLLM_API_KEY"):
        env["VLLM_API_KEY"] = env["SPD_API_KEY"]
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *argv], env


def main(argv: list[str] | None = None) -> int:
    cmd, env = vllm_command(sys.argv[1:] if argv is None else argv, dict(os.environ))
    os.execve(cmd[0], cmd, env)  # the server is vLLM's; this process becomes it


if __name__ == "__main__":
    sys.exit(main())
