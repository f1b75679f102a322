"""The second bundled model, Gemma-3-270M base, served for real: `python -m server --model
gemma3-270m` (what `spd serve --model gemma3-270m` runs) calibrates a rank-8 mode from GSM8K items
through the API, and a request with that mode changes the output and gives the transformers
backend's greedy tokens, alone and beside requests without the mode.

What Gemma 3 differs in, and this covers: one KV head of width 256, K normalised (k_norm) before
rotary, sliding-window layers (the default layers 9 and 17 are one sliding, one global), tied
embeddings, no chat template (plain prompts), and a tokenizer that must add BOS. The model is
pulled on first use into ~/.cache/spd/models/gemma3-270m (about 80 s once; cached after)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from server.harness import Server, wait_job

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

MODEL = "gemma3-270m"
MODE = "gmath"
PROMPTS = ["Question: Tom has 3 apples and buys 5 more. How many apples does he have?\nAnswer:",
           "The capital of France is", "Write a short poem about the sea.\n"]
N = 16


@pytest.fixture(scope="module")
def model_path():
    from spd_engine import models

    return models.pull(MODEL)


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_path):
    s = Server(tmp_path_factory.mktemp("spd-gemma"), extra=["--model", MODEL, "--max-model-len", "512"]).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def mode(http):
    r = http.post("/v1/modes", json={"name": MODE, "task": "math", "rank": 8,
                                     "calibration": {"dataset": "gsm8k", "limit": 4}})
    assert r.status_code == 202, r.text
    done = wait_job(http, r.json()["id"])
    assert done["state"] == "succeeded", done
    return MODE


def _tokens(http, prompt, **mode) -> list[int]:
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": N, "temperature": 0,
                                           "return_token_ids": True, **mode})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def test_gemma_serves_with_bos_and_a_mode_gives_the_transformers_backends_greedy_tokens(server, http, mode, model_path):
    from spd_engine.backend import GenerationRequest
    from spd_engine.formatting import text_prompt_ids
    from spd_engine.hf_backend import HFBackend
    from spd_engine.subspace import Store

    tok = http.post("/tokenize", json={"model": MODEL, "prompt": "The capital"}).json()["tokens"]
    assert tok[0] == 2, tok  # <bos>: Gemma without it degenerates ("The The The ...")
    pack = Store(server.store).load(MODE)
    assert pack.manifest.layers == [9, 17] and pack.manifest.ranks["9.k"] == [8]

    on = {"capability": MODE}
    jobs = [(p, m) for p in PROMPTS for m in ({}, on)]
    with ThreadPoolExecutor(len(jobs)) as pool:  # one continuous batch, rows with and without the mode
        batched = list(pool.map(lambda j: _tokens(http, j[0], **j[1]), jobs))
    solo = [_tokens(http, p, **m) for p, m in jobs]
    assert batched == solo

    be = HFBackend(str(model_path))
    be.add_subspace(pack)
    reqs = [GenerationRequest(text_prompt_ids(be.tokenizer, p), capability=(MODE,) if m else (), max_tokens=N)
            for p, m in jobs]
    assert reqs[0].prompt_ids[0] == 2
    eos = be.tokenizer.eos_token_id
    served = [t[:-1] if t and t[-1] == eos else t for t in solo]
    assert [c.token_ids for c in be.generate(reqs)] == served
    assert sum(served[i] != served[i + 1] for i in range(0, len(jobs), 2)) >= 2  # the mode changes outputs
