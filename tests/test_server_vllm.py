"""The server on the vLLM backend, against a real uvicorn process (`--backend vllm`) and the official
openai client: completion and chat, streaming and not, with and without a capability mode;
concurrent requests over two modes and none each equal to the request made alone (greedy);
a calibration upload that becomes a mode of the running vLLM engine with no restart; a PEFT
adapter hot-loaded through the API and used alone and together with a mode; streaming that sends
each piece as the engine produces it, while other requests share the batch."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from random_lora import write_random_lora
from server_harness import CALIBRATION, MODEL, Server, assert_concurrent_like_alone, wait_job

pytest.importorskip("vllm")

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ADAPTER = "noisy"
RND = {"name": "rnd", "kind": "math", "method": "random", "rank": 1, "layers": [0, 2, 4, 8, 12, 15, 20, 25, 29],
       "calibration": {"data": CALIBRATION}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("spd-vllm"), backend="vllm", extra=["--max-tokens", "128"]).start(timeout=400)
    yield s
    s.stop()


def _chat(oai, content, model=MODEL, **kw):
    return oai.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                       temperature=0, max_tokens=kw.pop("max_tokens", 8), **kw)


@pytest.fixture(scope="module")
def modes(server, http, oai):
    """`math` from a multipart calibration upload, `rnd` (random rank 1 on many layers, strong enough to
    change greedy tokens) from JSON: both become modes of the running engine, checked by the next request."""
    with pytest.raises(openai.NotFoundError):
        _chat(oai, "What is 3+4?", extra_body={"capability": "math"})
    pid = server.proc.pid
    up = http.post("/v1/subspaces", files={"file": ("cal.jsonl", CALIBRATION)},
                   data={"name": "math", "kind": "math", "rank": "8", "layers": "15,29"})
    assert up.status_code == 202, up.text
    js = http.post("/v1/subspaces", json=RND)
    assert js.status_code == 202, js.text
    for job in (up.json(), js.json()):
        done = wait_job(http, job["id"])
        assert done["state"] == "succeeded", done
    assert server.proc.poll() is None and server.proc.pid == pid  # same process: no restart
    health = http.get("/health").json()
    assert health["backend"] == "vllm" and health["capabilities"] == ["math", "rnd"]
    return ["math", "rnd"]


def test_calibration_upload_becomes_a_mode_used_by_the_next_request_without_restart(oai, http, modes):
    assert {s["name"]: s["loaded"] for s in http.get("/v1/subspaces").json()["data"]} == {"math": True, "rnd": True}
    r = _chat(oai, "What is 3+4?", extra_body={"capability": "math"})
    assert r.model_extra["spd"] == {"capability": ["math"], "capability_strength": 1.0, "adapter": None,
                                    "backend": "vllm"}
    assert r.choices[0].message.content


def test_completion_and_chat_streaming_and_not_with_and_without_a_capability(oai, modes):
    texts = {}
    for key, extra in (("none", {}), ("rnd", {"capability": "rnd"}),
                       ("both", {"capability": ["rnd", "math"], "capability_strength": 0.5}),
                       ("zero", {"capability": "rnd", "capability_strength": 0.0})):
        plain = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=10, temperature=0,
                                       extra_body=extra)
        assert plain.model_extra["spd"]["backend"] == "vllm" and plain.usage.completion_tokens >= 1
        streamed = list(oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=10,
                                               temperature=0, extra_body=extra, stream=True))
        assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text, key
        assert streamed[-1].choices[0].finish_reason == plain.choices[0].finish_reason
        chat = _chat(oai, "Tell me about the moon.", extra_body=extra)
        chunks = list(_chat(oai, "Tell me about the moon.", extra_body=extra, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content, key
        assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason
        spd = chat.model_extra["spd"]
        assert spd["backend"] == "vllm" and chunks[0].model_extra["spd"] == spd
        want = {"none": [], "rnd": ["rnd"], "both": ["math", "rnd"], "zero": ["rnd"]}[key]
        assert spd["capability"] == want
        texts[key] = (plain.choices[0].text, chat.choices[0].message.content)
    assert texts["zero"] == texts["none"]  # strength 0 is the base model
    assert texts["rnd"][1] != texts["none"][1]  # the mode changes the output


def test_32_concurrent_requests_over_two_modes_and_none_each_equal_the_request_made_alone(oai, http, modes):
    prompts = ["Count to five:", "My favourite fruit is",
               "Write one sentence about the sea and the sky at night:", "2 + 2 ="]
    combos = [(p, cap) for p in prompts for cap in (None, "math", "rnd")]

    def ask(combo):
        p, cap = combo
        extra = {"capability": cap} if cap else {}
        return oai.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0, extra_body=extra).choices[0].text

    alone = {c: ask(c) for c in combos}
    assert len({alone[(p, cap)] for p in prompts for cap in (None, "rnd")}) > len(prompts), "the mode changes nothing"
    assert_concurrent_like_alone(http, ask, (combos * 3)[:32], alone)


def test_a_long_streamed_completion_arrives_piece_by_piece_while_other_requests_are_served(oai, modes):
    prompt, extra = "Count from 1 to 100: 1, 2, 3,", {"capability": "math"}
    whole = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=96, temperature=0, extra_body=extra)
    assert whole.choices[0].finish_reason == "length"
    short_done = []

    def short():
        r = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0)
        short_done.append(time.perf_counter())
        return r.choices[0].text

    started = time.perf_counter()
    times, pieces = [], []
    with ThreadPoolExecutor(1) as pool:
        for chunk in oai.completions.create(model=MODEL, prompt=prompt, max_tokens=96, temperature=0,
                                            extra_body=extra, stream=True):
            if chunk.choices and chunk.choices[0].text:
                times.append(time.perf_counter())
                pieces.append(chunk.choices[0].text)
                if len(times) == 1:  # while it streams, a short request joins the running batch
                    other = pool.submit(short)
        other.result()
    assert "".join(pieces) == whole.choices[0].text
    assert len(pieces) >= 48, f"{len(pieces)} pieces for 96 tokens"
    first, last = times[0] - started, times[-1] - started
    assert first < 0.25 * last, f"first piece after {first:.2f}s, last after {last:.2f}s"
    assert short_done[0] < times[-1], "the short request waited for the stream to finish"


@pytest.fixture(scope="module")
def adapter(server, http):
    """A PEFT LoRA (q/k/v/o, r 8) with random nonzero B written into the server's adapters dir, then
    hot-loaded through the API."""
    from spd_engine import models

    write_random_lora(models.resolve(MODEL), server.data / "adapters" / ADAPTER)
    r = http.post("/v1/adapters", json={"name": ADAPTER, "directory": ADAPTER})
    assert r.status_code == 201, r.text
    return ADAPTER


def test_an_adapter_loaded_through_the_api_is_used_alone_and_with_a_capability(oai, http, modes, adapter):
    assert adapter in [m.id for m in oai.models.list().data]
    q = "Say hello."
    base = _chat(oai, q).choices[0].message.content
    tuned = _chat(oai, q, model=adapter)
    assert tuned.model_extra["spd"] == {"capability": [], "capability_strength": 0.0, "adapter": adapter,
                                        "backend": "vllm"}
    assert tuned.choices[0].message.content != base
    both = _chat(oai, q, model=adapter, extra_body={"capability": "rnd"})
    assert both.model_extra["spd"] == {"capability": ["rnd"], "capability_strength": 1.0, "adapter": adapter,
                                       "backend": "vllm"}
    assert both.choices[0].message.content not in (tuned.choices[0].message.content, base)
    streamed = _chat(oai, q, model=adapter, extra_body={"capability": "rnd"}, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == both.choices[0].message.content
    # the adapter and the base model side by side in one batch: each as when alone
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda m: _chat(oai, q, model=m).choices[0].message.content, [MODEL, adapter] * 2))
    assert got == [base, tuned.choices[0].message.content] * 2
    assert http.delete(f"/v1/adapters/{adapter}").status_code == 200
    with pytest.raises(openai.NotFoundError):
        _chat(oai, q, model=adapter)
    assert _chat(oai, q).choices[0].message.content == base
