"""Run a snippet in a new Python process: a second vLLM engine, isolated from the test's own."""
from __future__ import annotations

import json
import os
import subprocess
import sys


def in_fresh_process(code: str, args: dict, timeout: float = 900, **env: str | None):
    """Run `code` (reads ARGS, sets RESULT) in a new Python process and return RESULT. `env`
    overrides the environment; a None value removes the variable."""
    script = f"import json, sys\nARGS = json.loads(sys.argv[1])\n{code}\nprint('RESULT', json.dumps(RESULT))\n"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
           "OMP_NUM_THREADS": "1", **env}
    env = {k: v for k, v in env.items() if v is not None}
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(args)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    return json.loads(line[len("RESULT "):])
