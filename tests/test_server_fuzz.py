"""Failure handling: no client request can kill the engine. Hypothesis draws the completion and chat
routes' sampling options (logprobs, prompt_logprobs, echo, n, logit_bias, min_tokens, stop,
response_format, seed, max_tokens 0/1, empty and over-long prompts, modes and strengths, an adapter)
against real servers with LoRA on and off. Every answer is a 200 or a 4xx whose message names what
was wrong, and the server stays up."""
from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server.harness import CALIBRATION, MODEL, Server, wait_job

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ADAPTER = "fuzz-lora"
EXAMPLES = 60  # per route and server


@pytest.fixture(scope="module", params=["lora", "no-lora"])
def server(request, tmp_path_factory):
    lora = request.param == "lora"
    s = Server(tmp_path_factory.mktemp(f"spd-fuzz-{request.param}"),
               extra=["--enable-lora", "--max-loras", "1", "--max-lora-rank", "8"] if lora else [],
               env={"SPD_MAX_N": "4"}).start()
    with s.client() as http:
        r = http.post("/v1/modes", json={"name": "m1", "task": "math", "method": "random", "rank": 4,
                                         "calibration": {"data": CALIBRATION}})
        assert r.status_code == 202, r.text
        assert wait_job(http, r.json()["id"])["state"] == "succeeded"
        if lora:
            from server.harness import write_random_lora
            from spd_engine import models

            write_random_lora(models.resolve(MODEL), s.data / "adapters" / ADAPTER)
            assert http.post("/v1/adapters", json={"name": ADAPTER, "directory": ADAPTER}).status_code == 201
    s.lora = lora
    yield s
    s.stop()




def _options(lora: bool):
    """Sampling options both routes share (None: the field is left out)."""
    token = st.integers(-5, 60_000).map(str)
    # max_tokens always: without it vLLM generates up to the context length (minutes per request here)
    return st.fixed_dictionaries({"max_tokens": st.sampled_from([0, 1, 2, 4, -1])}, optional={
        "model": st.sampled_from([MODEL, ADAPTER] if lora else [MODEL]),
        "min_tokens": st.integers(-1, 6),
        "n": st.integers(0, 5),
        "temperature": st.sampled_from([0.0, 0.7, 1.5, -1.0]),
        "seed": st.integers(-2**63, 2**64),
        "stop": st.none() | st.text(max_size=3) | st.lists(st.text(max_size=4), max_size=3),
        "logit_bias": st.dictionaries(token, st.floats(-200, 200, allow_nan=False), max_size=3),
        "prompt_logprobs": st.integers(-2, 25),
        "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"},
                                            {"type": "json_schema", "json_schema": {"name": "o", "schema": {
                                                "type": "object", "properties": {"a": {"type": "integer"}}}}},
                                            {"type": "bogus"}]),
        "capability": st.sampled_from(["m1", ["m1", "m1"], "nope", "", ["m1"] * 9, 3]),
        "capability_strength": st.sampled_from([0.0, 0.5, 1.0, 1.5, -0.1, "x"]),
    })


_PROMPTS = st.sampled_from(["", "Hi", "2 + 2 =", "word " * 2100]) | st.lists(st.integers(-1, 60_000), max_size=6)


def _completion(lora: bool):
    extra = st.fixed_dictionaries({"prompt": _PROMPTS}, optional={"echo": st.booleans(), "logprobs": st.integers(-1, 25)})
    return st.tuples(_options(lora), extra).map(lambda t: {**t[0], **t[1]})


def _chat(lora: bool):
    content = st.sampled_from(["", "Hi", "What is 2 + 2?", "word " * 2100])
    extra = st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(
        ["user", "system", "assistant"]), "content": content}), min_size=0, max_size=3)}, optional={
        "logprobs": st.booleans(), "top_logprobs": st.integers(-1, 25), "echo": st.booleans()})
    return st.tuples(_options(lora), extra).map(lambda t: {**t[0], **t[1]})


def _check(server, http: httpx.Client, route: str, body: dict) -> None:
    body.setdefault("model", MODEL)
    r = http.post(route, json=body, timeout=300)
    assert r.status_code < 500, f"{r.status_code} for {body}: {r.text[:500]}\n{server.tail()}"
    if r.status_code >= 400:
        error = r.json().get("error", {})
        message, param = error.get("message") or "", error.get("param") or ""
        named = param or next((k for k in (*body, "prompt", "messages", "model") if k in message), None)
        assert named, f"{r.status_code} naming no field for {body}: {r.text[:300]}"
    assert server.proc.poll() is None and http.get("/health").status_code == 200, server.tail()


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_no_request_kills_the_engine_and_each_refusal_is_a_4xx_naming_the_field(server, http, route):
    bodies = _completion(server.lora) if route == "/v1/completions" else _chat(server.lora)

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(bodies)
    def one(body):
        _check(server, http, route, body)

    one()
