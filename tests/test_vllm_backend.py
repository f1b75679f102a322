"""The vLLM backend and its plugin on the real bundled model (float32, greedy): the projection in
vLLM's KV-cache write gives the transformers backend's tokens, rows of one continuous batch do
not interact, the prefix cache never crosses modes, and modes come and go in a running engine.

One in-process eager engine serves the whole module; the compiled-vs-eager test starts vLLM's default
compiled engine once in a subprocess (about 2 minutes here)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from spd_engine.backend import GenerationRequest  # noqa: E402
from spd_engine.calibrate import CalibrationConfig, calibrate  # noqa: E402
from spd_engine.data import load_examples, resolve_data  # noqa: E402
from spd_engine.formatting import text_prompt_ids  # noqa: E402
from spd_engine.subspace import PackError  # noqa: E402
from fresh_process import in_fresh_process  # noqa: E402
from server import vllm_plugin  # noqa: E402
from server.harness import write_random_lora  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = ["What is 12 plus 7?", "Tom has 3 apples and buys 5 more. How many now?", "Name a primary colour."]
A, B, C = "v-math", "v-rand", "v-late"


@pytest.fixture(scope="module")
def packs(hf_backend):
    """A: gradient subspace from 4 GSM8K items; B, C: random subspaces; all rank 16, layers 15, 29."""
    be = hf_backend
    gsm = load_examples(resolve_data("gsm8k"), "math", limit=4)
    made = {
        A: calibrate(be.model, be.tokenizer, be.model_info, "math", gsm, A, CalibrationConfig(rank=16)),
        B: calibrate(be.model, be.tokenizer, be.model_info, "math", gsm, B, CalibrationConfig(rank=16, method="random")),
        C: calibrate(be.model, be.tokenizer, be.model_info, "math", gsm, C,
                     CalibrationConfig(rank=8, method="random", seed=1)),
    }
    for p in made.values():
        if p.name in be.capabilities():
            be.remove_subspace(p.name)
        be.add_subspace(p)
    return made


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, bundled_path):
    """A PEFT LoRA adapter (q/k/v/o, r 8) with random nonzero B, so it changes the output."""
    return write_random_lora(bundled_path, tmp_path_factory.mktemp("adapter") / "lora")


@pytest.fixture(scope="module")
def vllm_be(tmp_path_factory, bundled_path, packs, adapter_dir):
    from spd_engine.vllm_backend import VLLMBackend

    be = VLLMBackend(str(bundled_path))
    be.add_subspace(packs[A])
    be.add_subspace(packs[B])
    be.load_adapter("lora", str(adapter_dir))
    yield be
    be.close()


def _ids(tok, i):
    return text_prompt_ids(tok, PROMPTS[i])


def _req(tok, i, cap=(), strength=1.0, adapter=None, n=24):
    return GenerationRequest(_ids(tok, i), capability=cap, strength=strength, adapter=adapter, max_tokens=n)


_STOCK = """
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from server import vllm_plugin
llm = LLM(model=ARGS["model"], dtype="float32", enforce_eager=True, distributed_executor_backend="uni", seed=0,
          max_model_len=2048)
outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ARGS["prompts"]],
                    SamplingParams(max_tokens=ARGS["n"], temperature=0.0), use_tqdm=False)
RESULT = {"patched": vllm_plugin.is_active(), "tokens": [list(o.outputs[0].token_ids) for o in outs]}
"""

_COMPILED = """
from spd_engine.vllm_backend import VLLMBackend
from spd_engine.backend import GenerationRequest
from spd_engine.subspace import Store
from server import vllm_plugin
be = VLLMBackend(ARGS["model"], enforce_eager=False, max_loras=0)
for name in ARGS["modes"]:
    be.add_subspace(Store(ARGS["store"]).load(name))
RESULT = {"tokens": [o.token_ids for o in be.generate([GenerationRequest(**{**r, "capability": tuple(r["capability"])})
                                                      for r in ARGS["requests"]])],
          "captured_route": vllm_plugin.PLUGIN.capture_config.enabled, "steps": vllm_plugin.PLUGIN.steps}
"""


_BF16 = """
from spd_engine.vllm_backend import VLLMBackend
from spd_engine.backend import GenerationRequest
from spd_engine.subspace import Store
be = VLLMBackend(ARGS["model"], dtype="bfloat16", max_loras=0)
be.add_subspace(Store(ARGS["store"]).load(ARGS["mode"]))
RESULT = {name: [o.token_ids for o in be.generate([GenerationRequest(**{**r, "capability": tuple(r["capability"])})
                                                  for r in batch])] for name, batch in ARGS["batches"].items()}
"""


def _stock_vllm_tokens(model, prompts, n):
    """Greedy tokens of vLLM with the plugin not loaded (VLLM_PLUGINS allow-lists other names)."""
    out = in_fresh_process(_STOCK, {"model": str(model), "prompts": prompts, "n": n}, VLLM_PLUGINS="none")
    assert not out["patched"], "the plugin was loaded in the stock-vLLM run"
    return out["tokens"]


def test_no_mode_and_strength_zero_give_stock_vllms_tokens_even_beside_a_projected_row(vllm_be, bundled_path):
    tok = vllm_be.tokenizer
    stock = _stock_vllm_tokens(bundled_path, [_ids(tok, i) for i in range(3)], 24)
    eos = tok.eos_token_id
    stock = [s[:-1] if s and s[-1] == eos else s for s in stock]
    # in one batch: plain rows, strength-0 rows, and a projected row that must not touch them
    outs = vllm_be.generate([_req(tok, 0), _req(tok, 1), _req(tok, 2), _req(tok, 0, (A,), 0.0),
                             _req(tok, 1, (A, B), 0.0), _req(tok, 1, (B,))])
    assert [o.token_ids for o in outs[:3]] == stock
    assert outs[3].token_ids == stock[0] and outs[4].token_ids == stock[1]
    assert outs[5].token_ids != stock[1]  # the projected row really was projected


def test_with_a_mode_vllm_gives_the_transformers_backends_greedy_tokens(vllm_be, hf_backend, packs):
    tok = vllm_be.tokenizer
    reqs = [_req(tok, i, cap, s) for i in range(3) for cap, s in (((A,), 1.0), ((B,), 1.0), ((B,), 0.5), ((A, B), 1.0))]
    v, h = vllm_be.generate(reqs), hf_backend.generate(reqs)
    for r, a, b in zip(reqs, v, h):
        assert a.token_ids == b.token_ids, f"{r.capability}@{r.strength} on {tok.decode(r.prompt_ids)!r}"
    base = vllm_be.generate([_req(tok, i) for i in range(3)])
    assert sum(a.token_ids != b.token_ids for a, b in zip(v, base * 4)) >= 3  # the modes change outputs


def test_every_request_of_a_mixed_batch_equals_its_solo_run(vllm_be):
    tok = vllm_be.tokenizer
    mixed = [_req(tok, 1, (A,)), _req(tok, 1, (B,)), _req(tok, 0, (A, B)), _req(tok, 1),
             _req(tok, 1, adapter="lora"), _req(tok, 1, (B,), adapter="lora"), _req(tok, 2, (A,), 0.5)]
    together = vllm_be.generate(mixed)
    alone = [vllm_be.generate([r])[0] for r in mixed]
    for r, t, a in zip(mixed, together, alone):
        assert t.token_ids == a.token_ids, f"{r.capability}/{r.adapter} differs in a mixed batch"
    base, lora, lora_b = together[3], together[4], together[5]
    assert lora.token_ids != base.token_ids and lora_b.token_ids != lora.token_ids  # adapter and mode both act


def test_same_long_prompt_under_two_modes_never_reuses_the_other_modes_kv_blocks_without_a_client_salt(vllm_be):
    """The plugin salts the prefix cache per mode in the front end: a caller that sends no
    cache_salt (raw LLM.generate here) still never gets blocks computed under another mode."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from spd_engine.vllm_requests import extra_args_for

    tok = vllm_be.tokenizer
    long_text = " ".join(ex.prompt for ex in load_examples(resolve_data("gsm8k"), "math", limit=6))
    ids = text_prompt_ids(tok, long_text + "\nWhat is the first number above?")
    assert len(ids) > 2 * 128  # spans full prefix-cache blocks (128 tokens on CPU)

    def raw(cap, salt=None):
        prompt = TokensPrompt(prompt_token_ids=ids, **({"cache_salt": salt} if salt else {}))
        sp = SamplingParams(max_tokens=16, temperature=0.0, extra_args=extra_args_for(cap, 1.0))
        out = vllm_be.llm.generate(prompt, sp, use_tqdm=False)[0]
        return list(out.outputs[0].token_ids), out.num_cached_tokens

    vllm_be.llm.reset_prefix_cache()
    own_b, cached = raw((B,))
    assert cached == 0
    vllm_be.llm.reset_prefix_cache()
    raw((A,))  # fills the cache under mode A
    after_a, cached = raw((B,))
    assert after_a == own_b and cached == 0, "mode B was served blocks computed under mode A"
    again, cached = raw((B,))
    assert again == own_b and cached >= 128  # a mode still reuses its own blocks
    with_client_salt, cached = raw((B,), salt="client-1")
    assert with_client_salt == own_b and cached == 0  # the client's salt is combined, not replaced


def test_a_mode_added_to_the_running_engine_serves_the_next_request(vllm_be, hf_backend, packs):
    tok = vllm_be.tokenizer
    assert C not in vllm_be.capabilities()
    vllm_be.add_subspace(packs[C])
    req = _req(tok, 1, (C,))
    assert vllm_be.generate([req])[0].token_ids == hf_backend.generate([req])[0].token_ids


def test_removing_a_mode_fails_its_requests_clearly_and_leaves_the_others_alone(vllm_be, packs):
    from vllm.exceptions import VLLMValidationError

    tok = vllm_be.tokenizer
    if C not in vllm_be.capabilities():
        vllm_be.add_subspace(packs[C])
    others = [_req(tok, 1, (A,)), _req(tok, 1)]
    before = vllm_be.generate(others)
    vllm_be.remove_subspace(C)
    with pytest.raises(VLLMValidationError, match=f"unknown capability '{C}'"):
        vllm_be.generate([_req(tok, 1, (C,)), *others])
    after = vllm_be.generate(others)
    assert [o.token_ids for o in after] == [o.token_ids for o in before]


def test_unknown_capability_or_adapter_is_refused_before_anything_is_scheduled(vllm_be):
    from vllm.exceptions import VLLMValidationError

    tok = vllm_be.tokenizer
    with pytest.raises(VLLMValidationError, match=f"unknown capability 'nope'.*{A}"):
        vllm_be.generate([_req(tok, 0), _req(tok, 0, ("nope",))])
    with pytest.raises(KeyError, match="unknown adapter 'nope'"):
        vllm_be.generate([_req(tok, 0, adapter="nope")])
    assert not vllm_be.llm.llm_engine.has_unfinished_requests()


# ---------------------------------------------------------------- plugin pieces without an engine


def test_kv_heads_of_each_tensor_parallel_rank_follow_vllms_sharding():
    from server.vllm_plugin import kv_heads_of_rank

    assert kv_heads_of_rank(3, 0, 1) is None
    assert [kv_heads_of_rank(4, r, 2) for r in range(2)] == [[0, 1], [2, 3]]
    assert [kv_heads_of_rank(2, r, 4) for r in range(4)] == [[0], [0], [1], [1]]  # replicated heads


def test_under_tensor_parallelism_head_packs_project_the_ranks_heads_and_layer_packs_are_refused(
        hf_backend, packs, tmp_path):
    from spd_engine.bank import ModeCache
    from spd_engine.projection import project
    from spd_engine.subspace import Store

    be = hf_backend
    gsm = load_examples(resolve_data("gsm8k"), "math", limit=2)
    head = calibrate(be.model, be.tokenizer, be.model_info, "math", gsm, "v-head",
                     CalibrationConfig(rank=8, method="random", granularity="head", layers=[15]))
    for p in (head, packs[B]):
        Store(tmp_path).save(p)
    rank1 = ModeCache(be.model_info, [1], tmp_path)  # this rank holds KV head 1 only
    rank1.bank_for([("v-head",)], {})
    x = torch.randn(5, 1, be.model_info.head_dim)
    got = rank1.bank.apply((15, "k"), x, torch.zeros(5, dtype=torch.long), torch.ones(5))
    assert torch.allclose(got.reshape(5, -1), project(x.reshape(5, -1), head.bases[(15, "k")][1]), atol=1e-5)
    with pytest.raises(PackError, match="layer granularity.*tensor parallelism"):
        rank1.bank.with_mode(packs[B])
    assert rank1.bank_for([(B,)], {})[1] == [()]  # a worker never projects a layer pack under TP


def test_the_front_end_validates_requests_and_salts_by_pack_content(tmp_path, packs, hf_backend):
    import copy
    import shutil

    from spd_engine.admission import Admission, AdmissionError
    from spd_engine.subspace import Store
    from spd_engine.vllm_requests import parse_extra_args

    assert parse_extra_args(None) == ((), 1.0)
    assert parse_extra_args({"capability": "b", "capability_strength": 0.5}) == (("b",), 0.5)
    assert parse_extra_args({"capability": ["b", "a", "b"]}) == (("a", "b"), 1.0)
    Store(tmp_path).save(packs[A])
    front, model = Admission(Store(tmp_path)), hf_backend.model_info
    args, salt = front.admit({"capability": A}, None, model)
    assert salt.startswith("spd-") and args["spd_digests"][A]
    assert front.admit({"capability": A}, "client", model)[1] != salt
    assert front.admit({"capability": A, "capability_strength": 0}, "c", model)[1] == "c"
    with pytest.raises(AdmissionError, match=f"unknown capability 'zzz'.*{A}") as e:
        front.admit({"capability": ["zzz", A]}, None, model)
    assert (e.value.parameter, e.value.value) == ("capability", "zzz")
    with pytest.raises(AdmissionError, match=r"capability_strength must be a number in \[0, 1\]"):
        front.admit({"capability": A, "capability_strength": 2}, None, model)
    # the same name with other bases (deleted and re-imported): another salt, another digest
    shutil.rmtree(tmp_path / A)
    other = copy.copy(packs[B])  # B's bases under A's name
    other.manifest = other.manifest.model_copy(update={"name": A})
    Store(tmp_path).save(other)
    args2, salt2 = front.admit({"capability": A}, None, model)
    assert salt2 != salt and args2["spd_digests"][A] != args["spd_digests"][A]
    assert (tmp_path / ".by-digest" / args["spd_digests"][A] / "bases.safetensors").is_file()  # the first, retained


def test_in_bfloat16_a_projected_row_changes_only_itself_and_strength_zero_is_no_mode(vllm_be, bundled_path):
    """bfloat16 (`spd serve`'s default on CPUs with BF16 instructions): vLLM's greedy tokens there
    depend on the batch's shape, so rows are compared within batches of one shape: a batch with a
    projected row and a strength-0 row against the same batch without any mode."""
    tok = vllm_be.tokenizer

    def req(i, cap=(), strength=1.0):
        return {"prompt_ids": _ids(tok, i), "capability": list(cap), "strength": strength, "max_tokens": 24}

    batches = {"modes": [req(0), req(1), req(1, (A,), 0.0), req(1, (A,))],
               "none": [req(0), req(1), req(1), req(1)]}
    out = in_fresh_process(_BF16, {"model": str(bundled_path), "store": str(vllm_be.store.root), "mode": A,
                                   "batches": batches})
    modes, none = out["modes"], out["none"]
    assert modes[:2] == none[:2]  # rows without a mode: untouched by the projected row beside them
    assert modes[2] == none[2]  # strength 0 is no mode
    assert modes[3] != none[3]  # the projected row really was projected


def test_compiled_engine_gives_the_eager_engines_tokens(vllm_be, bundled_path):
    tok = vllm_be.tokenizer
    reqs = [_req(tok, 1, (A,)), _req(tok, 0), _req(tok, 1, (A, B), 0.5)]
    eager = [o.token_ids for o in vllm_be.generate(reqs)]
    args = {"model": str(bundled_path), "store": str(vllm_be.store.root), "modes": [A, B],
            "requests": [{"prompt_ids": r.prompt_ids, "capability": list(r.capability), "strength": r.strength,
                          "max_tokens": r.max_tokens} for r in reqs]}
    out = in_fresh_process(_COMPILED, args)
    assert out["tokens"] == eager
    # the CPU captures no CUDA graphs, so the automatic choice is the grouped route, compiled or not
    assert out["captured_route"] is False and out["steps"]["captured"] == 0, out
    assert vllm_plugin.PLUGIN.capture_config.enabled is False and vllm_plugin.PLUGIN.captured is None


_CAPTURED = """
from spd_engine.vllm_backend import VLLMBackend
from spd_engine.backend import GenerationRequest
from spd_engine.subspace import Store
from server import vllm_plugin
be = VLLMBackend(ARGS["model"], max_loras=0)
for name in ARGS["modes"]:
    be.add_subspace(Store(ARGS["store"]).load(name))
RESULT = {"tokens": [[o.token_ids for o in be.generate([GenerationRequest(**{**r, "capability": tuple(r["capability"])})
                                                       for r in batch])] for batch in ARGS["batches"]]}
RESULT.update(steps=vllm_plugin.PLUGIN.steps, max_slots=vllm_plugin.PLUGIN.captured.max_slots)
"""


def test_the_captured_route_gives_the_grouped_routes_tokens_and_runs_steps_that_do_not_fit_eagerly(vllm_be,
                                                                                                    bundled_path):
    """`SPD_CAPTURED_ROUTE=1` (what FULL CUDA graphs need: every layer through the masked op over
    persistent buffers) on the CPU engine, which never captures: each request gets the grouped
    route's tokens, in a batch whose two capabilities fit the 2 slots and in one whose three do
    not (run eagerly, through the grouped route)."""
    tok = vllm_be.tokenizer
    batches = [[_req(tok, 1, (A,)), _req(tok, 0), _req(tok, 1, (A, B), 0.5), _req(tok, 2, (A,), 0.5)],
               [_req(tok, 1, (A,)), _req(tok, 1, (B,)), _req(tok, 1, (A, B))]]
    grouped = [[o.token_ids for o in vllm_be.generate(b)] for b in batches]
    base = vllm_be.generate([_req(tok, 1)])[0].token_ids
    assert grouped[0][0] != base and grouped[1][1] != base and grouped[0][1] == vllm_be.generate([_req(tok, 0)])[0].token_ids
    args = {"model": str(bundled_path), "store": str(vllm_be.store.root), "modes": [A, B],
            "batches": [[{"prompt_ids": r.prompt_ids, "capability": list(r.capability), "strength": r.strength,
                          "max_tokens": r.max_tokens} for r in b] for b in batches]}
    out = in_fresh_process(_CAPTURED, args, SPD_CAPTURED_ROUTE="1", SPD_CAPTURED_SLOTS="2")
    assert out["max_slots"] == 2
    assert out["tokens"] == grouped
    assert out["steps"]["captured"] > 0 and out["steps"]["eager"] > 0, out["steps"]
