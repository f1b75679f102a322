"""`capability: "auto"` against a real `spd serve` with three domain modes calibrated on real data
(GSM8K, a BIG-bench task, HumanEval): the engine chooses per request from the prompt's own K/V,
the response says which mode it applied, and the tokens are exactly those of the request that
names that mode, in any batch, streaming or not, through the field or the model name."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from server.harness import MODEL, Server, wait_job

from spd_engine.data import load_examples, resolve_data
from spd_engine.tasks import user_message

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

DOMAINS = {"math": ("gsm8k", "math"), "mcq": ("bigbench/date_understanding", "mcq"), "code": ("humaneval", "code")}
CALIBRATE, HELD_OUT = 8, 3  # calibration items, then held-out prompts per domain (disjoint)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("spd-auto")).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def prompts(http):
    jobs = []
    for name, (dataset, task) in DOMAINS.items():
        r = http.post("/v1/modes", json={"name": name, "task": task, "rank": 16,
                                         "calibration": {"dataset": dataset, "limit": CALIBRATE}})
        assert r.status_code == 202, r.text
        jobs.append(r.json())
    for job in jobs:
        assert wait_job(http, job["id"], timeout=900)["state"] == "succeeded"
    out = {}
    for name, (dataset, task) in DOMAINS.items():
        examples = load_examples(resolve_data(dataset) if dataset != "humaneval" else dataset, task)
        out[name] = [user_message(task, ex) for ex in examples[CALIBRATE:CALIBRATE + HELD_OUT]]
    return out


def _chat(http, content: str, stream: bool = False, **fields):
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 12,
            "temperature": 0, "stream": stream, **fields}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    if stream:
        import json

        text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                       for line in r.text.splitlines() if line.startswith("data: {") and '"choices":[{' in line)
    else:
        text = r.json()["choices"][0]["message"]["content"]
    return text, r.headers.get("x-spd-capability"), r.headers.get("x-spd-capability-strength")


def test_auto_applies_the_mode_it_reports_and_chooses_by_prompt(http, prompts):
    chosen = {}
    for domain, items in prompts.items():
        for content in items:
            text, applied, strength = _chat(http, content, capability="auto")
            assert applied in DOMAINS and strength == "1.0", (applied, strength)
            named, header, _ = _chat(http, content, capability=applied)
            assert header == applied and text == named, (domain, applied)
            plain, _, _ = _chat(http, content)
            chosen[(domain, content)] = (applied, text != plain)
    assert len({a for a, _ in chosen.values()}) >= 2, chosen  # the fixture can tell prompts apart
    assert any(changed for _, changed in chosen.values()), chosen  # and an applied mode changes answers


def test_auto_in_a_mixed_concurrent_batch_streaming_and_by_model_name_equals_alone(http, prompts):
    items = [c for cs in prompts.values() for c in cs]
    alone = {c: _chat(http, c, capability="auto") for c in items}
    jobs = [(c, kw) for c in items for kw in ({"capability": "auto"}, {"stream": True, "capability": "auto"},
                                              {"model": f"{MODEL}@auto"}, {"capability": "math"}, {})]
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda job: _chat(http, job[0], **job[1]), jobs))
    for (c, kw), (text, applied, _) in zip(jobs, got):
        if kw.get("capability") == "auto" or "model" in kw:
            assert (text, applied) == alone[c][:2], (kw, c[:40])
    listed = {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert f"{MODEL}@auto" in listed and f"{MODEL}@math" in listed


def test_auto_choices_are_counted_in_metrics_and_strength_zero_applies_nothing(http, prompts):
    content = prompts["math"][0]
    before = _count(http)
    _, applied, _ = _chat(http, content, capability="auto")
    after = _count(http)
    assert after.get(applied, 0) == before.get(applied, 0) + 1, (before, after)
    text, applied0, strength0 = _chat(http, content, capability="auto", capability_strength=0.0)
    assert (applied0, strength0) == ("", "0.0") and text == _chat(http, content)[0]


def test_auto_is_refused_composed_and_as_a_new_modes_name(http, prompts):
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                                "capability": ["auto", "math"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "capability", r.text
    r = http.post("/v1/modes", json={"name": "auto", "task": "math", "calibration": {"dataset": "gsm8k", "limit": 2}})
    assert r.status_code in (400, 422) and "auto" in r.text, r.text


def _count(http) -> dict[str, float]:
    out = {}
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("spd_auto_choices_total{"):
            out[line.split('capability="')[1].split('"')[0]] = float(line.split()[-1])
    return out
