"""The ways users start the server, as they run them: the README's `spd serve` command (a
start-up crash can never pass CI again), and stock vLLM's OpenAI server with `VLLM_PLUGINS`
naming this project's plugins, which exposes the same API."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from server.__main__ import BF16_FLAGS, SMALL_MACHINE_CPUS, cpu_flags
from server.harness import CALIBRATION, MODEL, Server, wait_job

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


class SpdServe(Server):
    """`spd serve --port P`: the console script a user runs (after `make serve`'s setup)."""

    def command(self) -> list[str]:
        return [str(Path(sys.executable).with_name("spd")), "serve", "--port", str(self.port), *self.extra]


@pytest.fixture
def random_pack(hf_backend):
    from spd_engine.calibrate import CalibrationConfig, calibrate
    from spd_engine.data import load_examples, resolve_data

    be = hf_backend
    gsm = load_examples(resolve_data("gsm8k"), "math", limit=2)
    return calibrate(be.model, be.tokenizer, be.model_info, "math", gsm, "smoke",
                     CalibrationConfig(rank=4, method="random", layers=list(range(0, 30, 3))))


def test_spd_serve_starts_with_its_cpu_defaults_answers_in_a_capability_mode_and_stops(tmp_path, random_pack):
    from spd_engine.subspace import Store

    Store(tmp_path / "store").save(random_pack)
    server = SpdServe(tmp_path).start()
    try:
        oai = server.openai_client()
        plain = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
        moded = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0,
                                       extra_body={"capability": "smoke"})
        assert plain.choices[0].text.strip() and moded.choices[0].text.strip()
        assert moded.choices[0].text != plain.choices[0].text
    finally:
        server.stop()
    assert server.proc.returncode is not None
    # its CPU defaults reached vLLM: bfloat16 where the CPU has BF16 instructions, the compiled
    # engine without vLLM's failing AOT cache load, no reserved core on 2 CPUs
    log = (tmp_path / f"server-{server.port}.log").read_text(errors="replace")
    assert f"dtype=torch.{'bfloat16' if cpu_flags() & BF16_FLAGS else 'float32'}" in log
    assert "enforce_eager=False" in log and "due to a load failure" not in log
    if len(os.sched_getaffinity(0)) <= SMALL_MACHINE_CPUS:
        assert "reserve_cpu_num=0" in log


def test_stock_vllm_server_with_vllm_plugins_serves_the_same_api(tmp_path):
    server = Server(tmp_path, stock=True).start()
    try:
        with server.client() as http:
            r = http.post("/v1/modes", json={"name": "rnd", "task": "math", "method": "random", "rank": 2,
                                             "layers": [3, 15, 29], "calibration": {"data": CALIBRATION}})
            assert r.status_code == 202, r.text
            assert wait_job(http, r.json()["id"])["state"] == "succeeded"
            oai = server.openai_client()
            top = oai.completions.create(model=MODEL, prompt="Write about the sea:", max_tokens=12, temperature=0,
                                         extra_body={"capability": "rnd"})
            xargs = oai.completions.create(model=MODEL, prompt="Write about the sea:", max_tokens=12, temperature=0,
                                           extra_body={"vllm_xargs": {"capability": "rnd"}})
            assert top.choices[0].text == xargs.choices[0].text
            bad = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "capability": "ghost"})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "capability"
    finally:
        server.stop()
