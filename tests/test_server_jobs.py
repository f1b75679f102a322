"""Durable jobs against a real server process: a pipeline with its self-distillation control arm
ends with hot-loaded adapters that change outputs and a paired comparison; kill -9 while a job runs leaves an intact store, a clearly failed job, a
queued job that runs after the restart, and no partial artifacts."""
from __future__ import annotations

import json
import time

import openai
import pytest
from server.harness import CALIBRATION, MODEL, Server, wait_job

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
LORA = ["--enable-lora", "--max-loras", "2", "--max-lora-rank", "16"]

PROMPTS = '{"id": "p1", "prompt": "What is 6+1?"}\n{"id": "p2", "prompt": "What is 9-3?"}\n'


def test_pipeline_job_ends_with_a_hot_loaded_adapter_that_changes_outputs(tmp_path):
    server = Server(tmp_path, extra=LORA).start()
    try:
        with server.client() as http:
            r = http.post("/v1/jobs", json={"type": "pipeline", "params": {
                "name": "pipe", "task": "math", "calibration": {"data": CALIBRATION},
                "calibration_params": {"rank": 8}, "prompts": {"data": PROMPTS}, "max_tokens": 12,
                "epochs": 1, "lr": 0.05, "lora_rank": 8, "adapter_name": "pipe-lora", "controls": ["self-distill"]}})
            assert r.status_code == 202, r.text
            job = wait_job(http, r.json()["id"], timeout=600)
            assert job["state"] == "succeeded", job
            assert job["progress"] == 1.0 and job["started"] <= job["finished"]
            assert job["result"]["adapter_loaded"] == "pipe-lora"
            evaluated = job["result"]["evaluate"]
            assert set(evaluated) == {"base", "spd", "self-distill", "adapter"} and evaluated["adapter"] == evaluated["spd"]
            assert all(e["ci_low"] <= e["value"] <= e["ci_high"] for e in evaluated.values())
            vs = job["result"]["compare"]["spd-vs-self-distill"]
            assert vs["ci_low"] <= vs["diff"] <= vs["ci_high"] and 0.0 <= vs["mcnemar"]["p"] <= 1.0
            assert abs(vs["diff"] - (evaluated["spd"]["value"] - evaluated["self-distill"]["value"])) < 1e-9
            served = {a["name"]: a for a in http.get("/v1/adapters").json()["data"]}
            assert set(served) == {"pipe-lora", "pipe-lora-self-distill"}
            spd, sd = served["pipe-lora"]["provenance"], served["pipe-lora-self-distill"]["provenance"]
            pack = json.loads((server.store / "pipe" / "manifest.json").read_text())
            assert spd["job"] == job["id"] and spd["distill"] == sd["distill"] and spd["distill"]["seed"] == 42
            assert [m["name"] for m in spd["modes"]] == ["pipe"] and len(spd["modes"][0]["digest"]) == 32
            assert spd["modes"][0]["calibration_sha256"] == pack["calibration"]["data_sha256"]
            assert sd["modes"] == [] and sd["generation"]["capability"] == []
            control = (server.data / "jobs" / job["id"] / "corpus_self-distill.jsonl").read_text().splitlines()
            assert len(control) == 2
            assert "pipe" in [s["name"] for s in http.get("/v1/modes").json()["data"] if s["loaded"]]
            tar = http.get(f"/v1/jobs/{job['id']}/artifact")
            assert tar.status_code == 200 and tar.headers["content-type"] == "application/x-tar"
            corpus = (server.data / "jobs" / job["id"] / "corpus.jsonl").read_text().splitlines()
            assert len(corpus) == 2

            oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300)
            msgs = [{"role": "user", "content": "What is 6+1?"}]
            base = oai.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=12)
            tuned = oai.chat.completions.create(model="pipe-lora", messages=msgs, temperature=0, max_tokens=12)
            assert tuned.choices[0].message.content != base.choices[0].message.content

            # a finished job is deleted with its files, but not while its adapter is served
            assert http.delete(f"/v1/jobs/{job['id']}").status_code == 409
            assert http.delete("/v1/adapters/pipe-lora").status_code == 200
            assert http.delete(f"/v1/jobs/{job['id']}").status_code == 409  # the control arm's adapter is served too
            assert http.delete("/v1/adapters/pipe-lora-self-distill").status_code == 200
            assert http.delete(f"/v1/jobs/{job['id']}").json() == {"id": job["id"], "deleted": True}
            assert not (server.data / "jobs" / job["id"]).exists()
    finally:
        server.stop()


def _alive(pgid: int) -> bool:
    import os

    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _crash(server: Server) -> None:
    """kill -9 the server; the engine core and any job subprocess must die with it."""
    server.kill9()
    deadline = time.time() + 30
    while time.time() < deadline and _alive(server.proc.pid):
        time.sleep(0.5)
    assert not _alive(server.proc.pid), "processes of the killed server live on"


def test_kill_9_during_a_job_then_restart_fails_it_clearly_runs_the_queued_one_and_leaves_no_partial_pack(tmp_path):
    server = Server(tmp_path).start()
    with server.client() as http:
        first = http.post("/v1/modes", json={"name": "first", "task": "math", "rank": 4,
                                             "calibration": {"data": CALIBRATION}}).json()
        second = http.post("/v1/modes", json={"name": "second", "task": "math", "rank": 4,
                                              "calibration": {"data": CALIBRATION}}).json()
        third = http.post("/v1/modes", json={"name": "third", "task": "math", "rank": 4,
                                             "calibration": {"data": CALIBRATION}}).json()
        assert http.delete(f"/v1/jobs/{third['id']}").json()["state"] == "cancelled"
        wait_job(http, first["id"], timeout=120, states=("running",))
    _crash(server)
    assert not (server.store / "first").exists()

    server.start()
    try:
        with server.client() as http:
            interrupted = http.get(f"/v1/jobs/{first['id']}").json()
            assert interrupted["state"] == "failed"
            assert interrupted["error"] == "interrupted: the server stopped while it ran"
            assert http.get(f"/v1/jobs/{first['id']}/artifact").status_code == 409
            done = wait_job(http, second["id"], timeout=200)
            assert done["state"] == "succeeded", done
            assert http.get(f"/v1/jobs/{third['id']}").json()["state"] == "cancelled"
            assert {j["id"] for j in http.get("/v1/jobs").json()["data"]} == {first["id"], second["id"], third["id"]}
            assert [s["name"] for s in http.get("/v1/modes").json()["data"]] == ["second"]
            # no hidden half-written pack (the retained bases of admitted requests live in .by-digest)
            assert sorted(p.name for p in server.store.iterdir() if p.name != ".by-digest") == ["second"]
            assert [s["name"] for s in http.get("/v1/modes").json()["data"] if s["loaded"]] == ["second"]
    finally:
        server.stop()


def test_generate_and_evaluate_jobs_run_through_the_serving_backend(tmp_path):
    server = Server(tmp_path).start()
    try:
        with server.client() as http:
            gen = http.post("/v1/jobs", json={"type": "generate", "params": {
                "task": "math", "prompts": {"data": PROMPTS}, "max_tokens": 8}}).json()
            ev = http.post("/v1/jobs", json={"type": "evaluate", "params": {
                "task": "math", "data": {"data": CALIBRATION}, "max_tokens": 8}}).json()
            g, e = wait_job(http, gen["id"]), wait_job(http, ev["id"])
            assert g["state"] == e["state"] == "succeeded", (g, e)
            assert (g["done"], g["total"]) == (2, 2)
            rows = http.get(f"/v1/jobs/{gen['id']}/artifact").text.splitlines()
            assert len(rows) == 2
            report = http.get(f"/v1/jobs/{ev['id']}/artifact").json()
            assert report["n"] == 3 and report["metric"] == "accuracy"
            dist = http.post("/v1/jobs", json={"type": "distill", "params": {"corpus_job": ev["id"]}})
            assert dist.status_code == 409 and dist.json()["error"]["param"] == "params.corpus_job"
            # an adapter needs LoRA, which this server was started without: 409 naming the flag
            from server.harness import write_random_lora
            from spd_engine import models

            write_random_lora(models.resolve(MODEL), server.data / "adapters" / "a1")
            lora = http.post("/v1/adapters", json={"name": "a1", "directory": "a1"})
            assert lora.status_code == 409 and "--enable-lora" in lora.json()["error"]["message"], lora.text
            # and a job that would end by loading one is refused before it runs
            pipe = http.post("/v1/jobs", json={"type": "pipeline", "params": {
                "name": "p", "task": "math", "calibration": {"data": CALIBRATION}, "prompts": {"data": PROMPTS}}})
            assert pipe.status_code == 409 and pipe.json()["error"]["param"] == "params.adapter_name", pipe.text
            assert "--enable-lora" in pipe.json()["error"]["message"]
    finally:
        server.stop()




def _hidden_files(server: Server, job_id: str) -> list[str]:
    return sorted(p.name for p in (server.data / "jobs" / job_id).glob(".*"))


def test_kill_9_during_each_job_type_then_restart_resumes_generation_and_fails_the_others_cleanly(tmp_path):
    """generate resumes from its partial corpus; distill, evaluate and pipeline fail as interrupted
    with no hidden temporaries and no published half-artifact (calibrate: the test above)."""
    n = 130  # three chunks of the job's 64 requests: the kill lands while the second one runs
    rows = [{"id": f"q{i}", "prompt": f"What is {i % 9}+{i % 7}?", "answer": f"The answer is {i % 9 + i % 7}"}
            for i in range(n)]
    data = "".join(json.dumps(r) + "\n" for r in rows)
    server = Server(tmp_path, extra=LORA).start()
    try:
        with server.client() as http:
            gen = http.post("/v1/jobs", json={"type": "generate", "params": {
                "task": "math", "prompts": {"data": data}, "max_tokens": 24}}).json()
            deadline = time.time() + 300
            while http.get(f"/v1/jobs/{gen['id']}").json()["done"] < 64 and time.time() < deadline:
                time.sleep(0.2)
            assert http.get(f"/v1/jobs/{gen['id']}").json()["state"] == "running"
        _crash(server)
        server.start()
        with server.client() as http:
            done = wait_job(http, gen["id"], timeout=400)
            assert done["state"] == "succeeded" and done["result"]["skipped"] >= 64, done  # resumed, not redone
            corpus = [json.loads(x) for x in http.get(f"/v1/jobs/{gen['id']}/artifact").text.splitlines()]
            assert sorted(r["id"] for r in corpus) == sorted(r["id"] for r in rows)

            started = {
                "distill": http.post("/v1/jobs", json={"type": "distill", "params": {
                    "corpus_job": gen["id"], "epochs": 20, "adapter_name": "never"}}).json(),
                "evaluate": http.post("/v1/jobs", json={"type": "evaluate", "params": {
                    "task": "math", "data": {"data": data}, "max_tokens": 24}}).json(),
                "pipeline": http.post("/v1/jobs", json={"type": "pipeline", "params": {
                    "name": "piped", "task": "math", "calibration": {"data": CALIBRATION},
                    "prompts": {"data": data}, "max_tokens": 24, "epochs": 20}}).json(),
            }
        for job_type, job in started.items():
            with server.client() as http:
                wait_job(http, job["id"], timeout=400, states=("running",))
                time.sleep(3)  # well inside the job (each takes minutes)
                assert http.get(f"/v1/jobs/{job['id']}").json()["state"] == "running", job_type
            _crash(server)
            server.start()
            with server.client() as http:
                after = http.get(f"/v1/jobs/{job['id']}").json()
                assert (after["state"], after["error"]) == ("failed", "interrupted: the server stopped while it ran"), job_type
                assert http.get(f"/v1/jobs/{job['id']}/artifact").status_code == 409, job_type
                assert _hidden_files(server, job["id"]) == [], job_type
                assert not (server.data / "jobs" / job["id"] / "adapter").exists(), job_type
                assert not (server.data / "jobs" / job["id"] / "report.json").exists(), job_type
        with server.client() as http:
            # the store holds only whole packs (the pipeline's mode, if its calibration had finished)
            names = [s["name"] for s in http.get("/v1/modes").json()["data"]]
            stored = server.store.iterdir() if server.store.exists() else []
            assert sorted(p.name for p in stored if p.name != ".by-digest") == sorted(names)
            assert http.get("/v1/adapters").json()["data"] == []
    finally:
        server.stop()
