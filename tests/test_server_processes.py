"""vLLM's process models through `spd serve` (real server processes, the bundled model): several
API-server processes (`--api-server-count 2`) share one job system and every adapter; several
engines (`--data-parallel-size 2`) each project modes; a dead engine makes the server exit non-zero
within seconds, and a restart resumes the job queue."""
from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from server.harness import CALIBRATION, MODEL, Server, wait_job

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PROMPTS = ["Count to five:", "My favourite fruit is", "2 + 2 =", "The best way to learn is"]
SLOW_CALIBRATION = "".join(json.dumps({"id": f"s{i}", "prompt": f"What is {i}+{i}?",
                                       "answer": f"{i}+{i} = {2 * i}. The answer is {2 * i}"}) + "\n" for i in range(40))


def _one_client_per_process(server: Server, processes: int = 2, tries: int = 60) -> list[httpx.Client]:
    """Keep-alive clients each talking to a different API-server process (`x-spd-process`)."""
    found: dict[str, httpx.Client] = {}
    for _ in range(tries):
        c = server.client()
        pid = c.get("/v1/jobs").headers["x-spd-process"]
        if pid in found:
            c.close()
        else:
            found[pid] = c
        if len(found) == processes:
            return list(found.values())
    raise AssertionError(f"only API-server processes {sorted(found)} answered in {tries} connections")


def _complete(http: httpx.Client, model: str, prompt: str, **extra) -> httpx.Response:
    return http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                                              **extra})


def _random_mode(http: httpx.Client, name: str, seed: int = 0) -> None:
    r = http.post("/v1/modes", json={"name": name, "task": "math", "method": "random", "rank": 2,
                                     "layers": list(range(seed % 3, 30, 3)), "calibration": {"data": CALIBRATION}})
    assert r.status_code == 202, r.text
    assert wait_job(http, r.json()["id"])["state"] == "succeeded"


@pytest.fixture(scope="module")
def two_api_servers(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("spd-api2"),
               extra=["--api-server-count", "2", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8"]).start()
    yield s
    s.stop()


def test_two_api_server_processes_serve_every_adapter_either_one_loaded_each_under_its_own_id(two_api_servers):
    from server.harness import write_random_lora
    from spd_engine import models

    a, b = _one_client_per_process(two_api_servers)
    for seed in (0, 1):
        write_random_lora(models.resolve(MODEL), two_api_servers.data / "adapters" / f"p{seed}", seed=seed)
    assert a.post("/v1/adapters", json={"name": "p0", "directory": "p0"}).status_code == 201
    assert b.post("/v1/adapters", json={"name": "p1", "directory": "p1"}).status_code == 201
    for http in (a, b):
        assert {"p0", "p1"} <= {m["id"] for m in http.get("/v1/models").json()["data"]}
    answers = {}
    for model in (MODEL, "p0", "p1"):
        got = [[_complete(http, model, p) for p in PROMPTS] for http in (a, b)]
        assert all(r.status_code == 200 for rs in got for r in rs), [r.text for rs in got for r in rs]
        texts = [[r.json()["choices"][0]["text"] for r in rs] for rs in got]
        assert texts[0] == texts[1], model  # the same adapter whichever process is asked
        answers[model] = texts[0]
    # two adapters loaded by two processes are two adapters in the engine (not one id twice)
    assert sum(x != y for x, y in zip(answers["p0"], answers["p1"])) >= len(PROMPTS) / 2, answers
    assert sum(x != y for x, y in zip(answers["p0"], answers[MODEL])) >= len(PROMPTS) / 2, answers
    assert b.delete("/v1/adapters/p0").status_code in (200, 204)
    assert _complete(a, "p0", PROMPTS[0]).status_code == 404  # unloaded by the other process
    for c in (a, b):
        c.close()


def test_two_api_server_processes_run_one_job_system_and_a_cancel_reaching_either_stops_the_job(two_api_servers):
    a, b = _one_client_per_process(two_api_servers)
    for http, other in ((a, b), (b, a)):  # submitted to one process, cancelled through each
        r = http.post("/v1/modes", json={"name": f"slow-{id(http)}", "task": "math", "rank": 4,
                                         "calibration": {"data": SLOW_CALIBRATION}})
        assert r.status_code == 202, r.text
        job = wait_job(other, r.json()["id"], states=("running", "succeeded", "failed"))
        assert job["state"] == "running", job
        assert other.delete(f"/v1/jobs/{job['id']}").status_code in (200, 202, 204)
        assert wait_job(http, job["id"], timeout=60)["state"] == "cancelled"
    _random_mode(a, "both-see-it")
    assert [j["state"] for j in b.get("/v1/jobs").json()["data"]].count("failed") == 0  # no start-up recovery hit
    assert "both-see-it" in {s["name"] for s in b.get("/v1/modes").json()["data"]}
    for c in (a, b):
        c.close()


def test_two_engines_each_project_modes_and_every_answer_equals_the_request_made_alone(tmp_path):
    s = Server(tmp_path, extra=["--data-parallel-size", "2"]).start()
    try:
        with s.client() as http:
            _random_mode(http, "dp1", seed=0)
            _random_mode(http, "dp2", seed=1)
            configs = [{}, {"capability": "dp1"}, {"capability": "dp2", "capability_strength": 0.5},
                       {"capability": ["dp1", "dp2"]}]
            combos = [(p, c) for p in PROMPTS for c in range(len(configs))]

            def ask(item):
                r = _complete(http, MODEL, item[0], **configs[item[1]])
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]

            alone = {x: ask(x) for x in combos}
            assert sum(alone[(p, 1)] != alone[(p, 0)] for p in PROMPTS) >= len(PROMPTS) / 2  # the modes act
            work = combos * 3
            with ThreadPoolExecutor(16) as pool:
                together = list(pool.map(ask, work))
            assert [t for w, t in zip(work, together) if t != alone[w]] == []
            engines = {line.split('engine="')[1].split('"')[0] for line in http.get("/metrics").text.splitlines()
                       if line.startswith("vllm:request_success_total") and 'engine="' in line
                       and float(line.split()[-1]) > 0}
            assert engines == {"0", "1"}, engines  # both engines served requests
    finally:
        s.stop()


def _engine_core_pid(server: Server) -> int:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read()
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == server.proc.pid and (b"EngineCore" in cmd or "EngineCore" in stat):
                return int(pid)
    raise AssertionError("no engine-core child process found")


def test_a_dead_engine_makes_the_server_exit_non_zero_within_seconds_and_a_restart_resumes_the_queue(tmp_path):
    s = Server(tmp_path, env={"SPD_MAX_QUEUED_JOBS": "8"}).start()
    try:
        with s.client() as http:
            ids = []
            for i in range(2):
                r = http.post("/v1/modes", json={"name": f"q{i}", "task": "math", "rank": 4,
                                                 "calibration": {"data": CALIBRATION}})
                assert r.status_code == 202, r.text
                ids.append(r.json()["id"])
        os.kill(_engine_core_pid(s), signal.SIGKILL)
        t0 = time.time()
        code = s.proc.wait(timeout=30)
        died = s.tail()
        assert code != 0 and time.time() - t0 < 20, (code, time.time() - t0, died)
        s.start()
        with s.client() as http:
            jobs = [wait_job(http, i) for i in ids]
            assert [j["state"] for j in jobs] == ["succeeded", "succeeded"], ([j.get("error") for j in jobs], died)
            assert http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}).status_code == 200
        s.stop()
        assert s.proc.returncode == 0, s.tail()  # a SIGTERM is a clean stop, not an engine death
    finally:
        s.stop()
