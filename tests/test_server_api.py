"""The server's HTTP surface, against a real uvicorn process and the official openai client:
completions and chat (streaming and not) with and without capability modes and adapters,
batching that never changes a greedy answer, calibration uploads that become modes without a
restart, pack archives, and a 4xx naming the field for every bad input."""
from __future__ import annotations

import io
import tarfile

import httpx
import openai
import pytest
from server_harness import CALIBRATION, MODEL, Server, assert_concurrent_like_alone, wait_job

pytestmark = pytest.mark.slow

KEY = "test-key-123"
BODY_LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("spd-api"), api_key=KEY,
               extra=["--max-body-bytes", str(BODY_LIMIT), "--max-prompt-tokens", "512", "--max-tokens", "64"]).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def modes(http):
    """Three modes made through the API: a gradient one from a multipart upload, and from JSON two random
    rank-1 ones on many layers (strong enough to change a few greedy tokens)."""
    up = http.post("/v1/subspaces", files={"file": ("cal.jsonl", CALIBRATION)},
                   data={"name": "math", "kind": "math", "rank": "8", "layers": "15,29"})
    assert up.status_code == 202, up.text
    js = http.post("/v1/subspaces", json={"name": "rnd", "kind": "math", "method": "random", "rank": 1,
                                          "layers": [0, 2, 4, 8, 12, 15, 20, 25, 29],
                                          "calibration": {"data": CALIBRATION}})
    assert js.status_code == 202, js.text
    js2 = http.post("/v1/subspaces", json={"name": "rnd2", "kind": "math", "method": "random", "rank": 1,
                                           "layers": [1, 3, 6, 10, 14, 18, 22, 26, 28],
                                           "calibration": {"data": CALIBRATION}})
    assert js2.status_code == 202, js2.text
    for job in (up.json(), js.json(), js2.json()):
        done = wait_job(http, job["id"])
        assert done["state"] == "succeeded", done
    return ["math", "rnd", "rnd2"]


def _chat(oai, content, **kw):
    return oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                       temperature=0, max_tokens=kw.pop("max_tokens", 8), **kw)


def test_health_is_open_but_every_other_endpoint_needs_the_api_key(server, http):
    assert httpx.get(f"{server.url}/health").status_code == 200
    for path in ("/v1/models", "/v1/subspaces", "/v1/jobs", "/metrics", "/openapi.json"):
        r = httpx.get(f"{server.url}{path}")
        assert r.status_code == 401 and r.json()["error"]["param"] == "authorization", path
        assert httpx.get(f"{server.url}{path}", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert http.get("/v1/models").status_code == 200


def test_uploaded_calibration_becomes_a_mode_usable_by_the_next_request_without_restart(oai, http, modes):
    listed = {s["name"]: s for s in http.get("/v1/subspaces").json()["data"]}
    assert listed["math"]["loaded"] and listed["rnd"]["loaded"]
    shown = http.get("/v1/subspaces/math").json()
    assert shown["manifest"]["ranks"] == {"15.k": [8], "15.v": [8], "29.k": [8], "29.v": [8]}
    assert len(shown["spectrum"]["15.k.g0"]["singular_values"]) == 192
    r = _chat(oai, "What is 3+4?", extra_body={"capability": "math"})
    assert r.model_extra["spd"]["capability"] == ["math"] and r.model_extra["spd"]["capability_strength"] == 1.0
    assert r.choices[0].message.content


def test_completion_and_chat_stream_the_same_text_as_without_streaming_with_and_without_a_mode(oai, modes):
    for extra in ({}, {"capability": "rnd", "capability_strength": 0.5}, {"capability": ["math", "rnd"]}):
        plain = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0,
                                       extra_body=extra)
        streamed = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0,
                                          extra_body=extra, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
        assert plain.usage.completion_tokens >= 1
        chat = _chat(oai, "Name a color.", extra_body=extra)
        chunks = list(_chat(oai, "Name a color.", extra_body=extra, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason
        want = sorted([extra["capability"]] if isinstance(extra.get("capability"), str) else extra.get("capability", []))
        assert chat.model_extra["spd"]["capability"] == want


def test_ignore_eos_generates_exactly_max_tokens_past_the_end_of_the_answer(oai):
    short = _chat(oai, "Reply with one word: yes or no?", max_tokens=32)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 32
    full = _chat(oai, "Reply with one word: yes or no?", max_tokens=32, extra_body={"ignore_eos": True})
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 32


def test_a_mode_changes_the_output_and_strength_zero_is_the_base_model(oai, modes):
    base = _chat(oai, "Tell me about the moon.").choices[0].message.content
    zero = _chat(oai, "Tell me about the moon.", extra_body={"capability": "rnd", "capability_strength": 0.0})
    full = _chat(oai, "Tell me about the moon.", extra_body={"capability": "rnd", "capability_strength": 1.0})
    assert zero.choices[0].message.content == base
    assert full.choices[0].message.content != base


def test_64_concurrent_requests_over_three_modes_and_none_each_equal_the_request_made_alone(oai, http, modes):
    prompts = ["Count to five:", "My favourite fruit is",
               "Write one sentence about the sea and the sky at night:", "2 + 2 ="]
    combos = [(p, cap) for p in prompts for cap in (None, "math", "rnd", "rnd2")]

    def ask(combo):
        p, cap = combo
        extra = {"capability": cap} if cap else {}
        return oai.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0, extra_body=extra).choices[0].text

    alone = {c: ask(c) for c in combos}
    assert len({alone[(p, cap)] for p in prompts[:2] for cap in (None, "rnd", "rnd2")}) > 2, "modes change nothing"
    work = combos * 4  # 64 concurrent requests, 16 per mode (and none), prompts of different lengths
    assert len(work) == 64
    assert_concurrent_like_alone(http, ask, work, alone)


def test_an_adapter_loads_hot_changes_output_and_unloads(oai, http, server, tmp_path_factory):
    import torch
    from peft import LoraConfig, get_peft_model

    from spd_engine import models

    model, _ = models.load(models.resolve(MODEL))
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(server.data / "adapters" / "noisy")
    del peft_model, model

    r = http.post("/v1/adapters", json={"name": "noisy", "directory": "noisy"})
    assert r.status_code == 201, r.text
    assert "noisy" in [m.id for m in oai.models.list().data]
    base = _chat(oai, "Say hello.").choices[0].message.content
    tuned = oai.chat.completions.create(model="noisy", messages=[{"role": "user", "content": "Say hello."}],
                                        temperature=0, max_tokens=8)
    assert tuned.model_extra["spd"]["adapter"] == "noisy"
    assert tuned.choices[0].message.content != base
    streamed = oai.chat.completions.create(model="noisy", messages=[{"role": "user", "content": "Say hello."}],
                                           temperature=0, max_tokens=8, stream=True, extra_body={"capability": "math"})
    assert "".join(c.choices[0].delta.content or "" for c in streamed)
    assert http.post("/v1/adapters", json={"name": "noisy", "directory": "noisy"}).status_code == 409
    assert http.delete("/v1/adapters/noisy").status_code == 200
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="noisy", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert _chat(oai, "Say hello.").choices[0].message.content == base


def _store_snapshot(server, http):
    files = sorted(str(p.relative_to(server.store)) for p in server.store.rglob("*"))
    return files, http.get("/v1/subspaces").json(), len(http.get("/v1/jobs").json()["data"])


BAD = [
    # (method, path, kwargs, status, param)
    ("post", "/v1/completions", {"json": {"model": MODEL, "prompt": "x", "capability": "nope"}}, 404, "capability"),
    ("post", "/v1/completions", {"json": {"model": MODEL, "prompt": "x", "capability": "math", "capability_strength": 1.5}}, 422, "capability_strength"),
    ("post", "/v1/completions", {"json": {"model": MODEL, "prompt": "x", "capability_strength": -0.1}}, 422, "capability_strength"),
    ("post", "/v1/completions", {"json": {"model": MODEL, "prompt": "x", "capability": "../etc"}}, 422, "capability"),
    ("post", "/v1/completions", {"json": {"model": "gpt-9", "prompt": "x"}}, 404, "model"),
    ("post", "/v1/completions", {"json": {"model": MODEL}}, 422, "prompt"),
    ("post", "/v1/completions", {"json": {"model": MODEL, "prompt": "x", "max_tokens": 0}}, 422, "max_tokens"),
    ("post", "/v1/completions", {"json": {"model": MODEL, "prompt": "x", "max_tokens": 65}}, 400, "max_tokens"),
    ("post", "/v1/completions", {"json": {"model": MODEL, "prompt": "word " * 600}}, 400, "prompt"),
    ("post", "/v1/completions", {"json": {"model": MODEL, "prompt": "x", "temperature": "hot"}}, 422, "temperature"),
    ("post", "/v1/completions", {"json": {"model": MODEL, "prompt": "x", "n": 2}}, 422, "n"),
    ("post", "/v1/completions", {"json": {"model": MODEL, "prompt": "x", "capabilty": "math"}}, 422, "capabilty"),
    ("post", "/v1/completions", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 422, "body"),
    ("post", "/v1/completions", {"json": [1, 2]}, 422, "body"),
    ("post", "/v1/chat/completions", {"json": {"model": MODEL, "messages": []}}, 422, "messages"),
    ("post", "/v1/chat/completions", {"json": {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}}, 422, "messages.0.role"),
    ("post", "/v1/chat/completions", {"json": {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "capability": ["math", "ghost"]}}, 404, "capability"),
    ("post", "/v1/subspaces", {"json": {"name": "x1", "kind": "math", "calibration": {"data": '{"prompt": "q", "answer": "The answer is 3"}\n{"prompt": "q2"\n'}}}, 422, "calibration"),
    ("post", "/v1/subspaces", {"json": {"name": "x1", "kind": "math", "calibration": {"data": '{"prompt": "q", "answer": "The answer is 3"}\n{"prompt": "q", "answer": "no number"}\n'}}}, 422, "calibration"),
    ("post", "/v1/subspaces", {"json": {"name": "x1", "kind": "poetry", "calibration": {"data": CALIBRATION}}}, 422, "kind"),
    ("post", "/v1/subspaces", {"json": {"name": "../../evil", "kind": "math", "calibration": {"data": CALIBRATION}}}, 422, "name"),
    ("post", "/v1/subspaces", {"json": {"name": "/abs", "kind": "math", "calibration": {"data": CALIBRATION}}}, 422, "name"),
    ("post", "/v1/subspaces", {"json": {"name": "x1", "kind": "math", "layers": [99], "calibration": {"data": CALIBRATION}}}, 422, "layers"),
    ("post", "/v1/subspaces", {"json": {"name": "x1", "kind": "math", "rank": 999, "calibration": {"data": CALIBRATION}}}, 422, "rank"),
    ("post", "/v1/subspaces", {"json": {"name": "x1", "kind": "math", "rank": 0, "calibration": {"data": CALIBRATION}}}, 422, "rank"),
    ("post", "/v1/subspaces", {"json": {"name": "math", "kind": "math", "calibration": {"data": CALIBRATION}}}, 409, "name"),
    ("post", "/v1/subspaces", {"files": {"file": ("c.jsonl", '{"prompt": "ok", "answer": "The answer is 1"}\n\n{"prompt": 5}\n')}, "data": {"name": "x2", "kind": "math"}}, 422, "calibration"),
    ("post", "/v1/subspaces", {"files": {"file": ("c.jsonl", "x" * (BODY_LIMIT + 10))}, "data": {"name": "x3", "kind": "math"}}, 413, "body"),
    ("get", "/v1/subspaces/ghost", {}, 404, "name"),
    ("delete", "/v1/subspaces/ghost", {}, 404, "name"),
    ("get", "/v1/subspaces/..%2F..%2Fetc", {}, 404, None),
    ("post", "/v1/jobs", {"json": {"kind": "teleport", "params": {}}}, 422, "kind"),
    ("post", "/v1/jobs", {"json": {"kind": "generate", "params": {"task_kind": "math", "prompts": {"dataset": "../../etc/passwd"}}}}, 422, "params.prompts.dataset"),
    ("post", "/v1/jobs", {"json": {"kind": "generate", "params": {"task_kind": "math", "capability": ["ghost"], "prompts": {"data": CALIBRATION}}}}, 404, "params.capability"),
    ("post", "/v1/jobs", {"json": {"kind": "distill", "params": {"corpus_job": "job-nope"}}}, 404, "params.corpus_job"),
    ("get", "/v1/jobs/job-nope", {}, 404, "id"),
    ("delete", "/v1/jobs/job-nope", {}, 404, "id"),
    ("get", "/v1/jobs/job-nope/artifact", {}, 404, "id"),
    ("post", "/v1/adapters", {"json": {"name": "a1", "directory": "../../etc"}}, 422, "directory"),
    ("post", "/v1/adapters", {"json": {"name": "a1", "directory": "missing"}}, 404, "directory"),
    ("post", "/v1/adapters", {"json": {"name": "a1"}}, 422, "directory"),
    ("delete", "/v1/adapters/ghost", {}, 404, "name"),
    ("post", "/v1/subspaces/import", {"content": b"not a tar at all", "headers": {"content-type": "application/x-tar"}}, 422, "file"),
]


def test_every_bad_input_gets_its_4xx_naming_the_field_and_leaves_the_store_unchanged(server, http, modes):
    before = _store_snapshot(server, http)
    for method, path, kwargs, status, param in BAD:
        r = getattr(http, method)(path, **kwargs)
        assert r.status_code == status, (path, kwargs, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, r.text
        if param is not None:
            assert err["param"] == param, (path, kwargs, err)
            assert param.split(".")[-1] in err["message"] or status in (404, 409, 413), err
    assert _store_snapshot(server, http) == before
    assert http.get("/health").status_code == 200


def test_unknown_capability_lists_the_known_ones_and_bad_line_is_named(http, modes):
    err = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "capability": "nope"}).json()["error"]
    assert "math" in err["message"] and "rnd" in err["message"]
    bad = '{"prompt": "q", "answer": "The answer is 3"}\n{"prompt": "q2", "answer": "The answer is 4", "colour": 1}\n'
    err = http.post("/v1/subspaces", json={"name": "x1", "kind": "math", "calibration": {"data": bad}}).json()["error"]
    assert err["message"].startswith("calibration:2:") and "colour" in err["message"]


def test_a_pack_exports_and_imports_as_an_archive_and_unsafe_archives_are_refused(server, http, modes):
    tar = http.get("/v1/subspaces/math/export")
    assert tar.status_code == 200 and tar.headers["content-type"] == "application/x-tar"
    assert http.post("/v1/subspaces/import", files={"file": ("m.tar", tar.content)}).status_code == 409  # name taken
    r = http.post("/v1/subspaces/import", files={"file": ("m.tar", tar.content)}, data={"name": "math2"})
    assert r.status_code == 201, r.text
    assert "math2" in http.get("/health").json()["capabilities"]
    before = _store_snapshot(server, http)
    for members in ([("../evil/manifest.json", b"{}")], [("/abs/manifest.json", b"{}")],
                    [("p/manifest.json", b"{}"), ("p/bases.safetensors", b"xx")],
                    [("p/manifest.json", b"{}"), ("p/bases.safetensors", b"x"), ("p/extra.sh", b"x")]):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        r = http.post("/v1/subspaces/import", files={"file": ("x.tar", buf.getvalue())})
        assert r.status_code == 422 and r.json()["error"]["param"] == "file", (members, r.text)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        link = tarfile.TarInfo("p/manifest.json")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(link)
    assert http.post("/v1/subspaces/import", files={"file": ("x.tar", buf.getvalue())}).status_code == 422
    assert _store_snapshot(server, http) == before
    assert http.delete("/v1/subspaces/math2").status_code == 200


def test_deleting_a_subspace_stops_serving_it(oai, http, modes):
    tar = http.get("/v1/subspaces/rnd/export").content
    assert http.post("/v1/subspaces/import", files={"file": ("r.tar", tar)}, data={"name": "tmpmode"}).status_code == 201
    assert _chat(oai, "hi", extra_body={"capability": "tmpmode"}).choices[0].message.content
    assert http.delete("/v1/subspaces/tmpmode").status_code == 200
    with pytest.raises(openai.NotFoundError):
        _chat(oai, "hi", extra_body={"capability": "tmpmode"})
    assert "tmpmode" not in [s["name"] for s in http.get("/v1/subspaces").json()["data"]]


def test_metrics_count_requests_and_tokens_per_capability(oai, http, modes):
    _chat(oai, "hi", extra_body={"capability": "math"})
    _chat(oai, "hi")
    text = http.get("/metrics").text
    assert 'spd_requests_total{capability="math",endpoint="chat",status="200"}' in text
    assert 'spd_tokens_total{capability="none",type="completion"}' in text
    assert "spd_request_latency_seconds_bucket" in text and "spd_queue_depth" in text
    assert 'spd_jobs{state="succeeded"}' in text


def test_openapi_schema_lists_every_endpoint(http):
    paths = http.get("/openapi.json").json()["paths"]
    for p in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/subspaces", "/v1/subspaces/{name}",
              "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/artifact", "/v1/adapters", "/health", "/metrics"):
        assert p in paths
