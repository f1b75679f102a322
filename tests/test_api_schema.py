"""The OpenAPI schema of this project's routes is a contract clients generate code from:
schemathesis, run against a real server's served schema, finds no server error and no
conformance failure (undocumented status codes, responses off their schema, missing `Allow` on
405, ...). vLLM's own routes are vLLM's contract and are left out."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from server.harness import Server

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

OURS = "^/v1/(modes|jobs|adapters)"  # the deprecated /v1/subspaces paths are the same routes
CONFIG = Path(__file__).with_name("schemathesis.toml")  # where a 422 is the documented answer to valid-looking input


def test_schemathesis_finds_no_server_error_and_no_conformance_failure_on_our_routes(tmp_path):
    st = Path(sys.executable).with_name("st")
    server = Server(tmp_path, env={"SPD_MAX_QUEUED_JOBS": "4"}).start()
    try:
        proc = subprocess.run(
            [str(st), "--config-file", str(CONFIG), "run", f"{server.url}/openapi.json", "--include-path-regex", OURS, "--checks", "all",
             "--max-examples", "12", "--generation-deterministic", "--no-color"],
            capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stdout[-6000:]
