"""Method correctness on the real bundled model (transformers backend): the projection happens at
the KV-cache site, strength 0 is the unmodified model, and rows of a mixed batch do not interact."""
import pytest
import torch

from spd_engine.backend import GenerationRequest
from spd_engine.calibrate import CalibrationConfig, calibrate
from spd_engine.data import load_examples, resolve_data
from spd_engine.formatting import prompt_ids
from spd_engine.hf_backend import SiteCache, projector
from spd_engine.projection import project
from spd_engine.tasks import Example

pytestmark = pytest.mark.slow

PROMPTS = ["What is 12 plus 7?", "Name a primary colour.", "Tom has 3 apples and buys 5 more. How many now?"]


@pytest.fixture(scope="module")
def modes(hf_backend):
    """Two real modes: math from GSM8K and a random one, both rank 16 on layers 15 and 29."""
    gsm = load_examples(resolve_data("gsm8k"), "math", limit=4)
    be = hf_backend
    math_pack = calibrate(be.model, be.tokenizer, be.model_info, "math", gsm, "t-math", CalibrationConfig(rank=16))
    rand_pack = calibrate(be.model, be.tokenizer, be.model_info, "math", gsm, "t-rand",
                          CalibrationConfig(rank=16, method="random"))
    for p in (math_pack, rand_pack):
        if p.name in be.capabilities():
            be.remove_subspace(p.name)
        be.add_subspace(p)
    return math_pack, rand_pack


def _ids(be, text):
    return prompt_ids(be.tokenizer, "custom", Example(id="p", prompt=text))


def _req(be, text, cap=(), strength=1.0, n=24):
    return GenerationRequest(_ids(be, text), capability=cap, strength=strength, max_tokens=n)


def test_strength_zero_and_no_mode_give_the_unmodified_models_greedy_tokens(hf_backend, modes):
    be = hf_backend
    ids = _ids(be, PROMPTS[0])
    with torch.no_grad():
        plain = be.model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                  pad_token_id=be.tokenizer.pad_token_id)[0, len(ids):].tolist()
    eos = be.tokenizer.eos_token_id
    plain = plain[: plain.index(eos)] if eos in plain else plain
    none, zero = be.generate([_req(be, PROMPTS[0]), _req(be, PROMPTS[0], ("t-math",), 0.0)])
    assert none.token_ids == plain
    assert zero.token_ids == plain


def test_strength_one_caches_P_k_at_the_first_projected_layer_and_P_is_idempotent_there(hf_backend, modes):
    be, (math_pack, _) = hf_backend, modes
    ids = torch.tensor([_ids(be, PROMPTS[2])])
    bank = be.bank
    raw = SiteCache(be.model.config, lambda layer, k, v: (k, v))
    hooked = SiteCache(be.model.config, projector(bank, torch.tensor([bank.slot(("t-math",))]), torch.ones(1)))
    with torch.no_grad():
        be.model(input_ids=ids, past_key_values=raw, use_cache=True)
        be.model(input_ids=ids, past_key_values=hooked, use_cache=True)
    rows = lambda t: t.transpose(1, 2).reshape(-1, t.shape[1] * t.shape[3])  # noqa: E731
    for kind, U in (("k", math_pack.bases[(15, "k")][0]), ("v", math_pack.bases[(15, "v")][0])):
        r = rows(getattr(raw.layers[15], "keys" if kind == "k" else "values"))
        h = rows(getattr(hooked.layers[15], "keys" if kind == "k" else "values"))
        assert torch.allclose(h, project(r, U), atol=1e-4)  # layers below 15 are untouched
        assert not torch.allclose(h, r, atol=1e-3)
    k29 = rows(hooked.layers[29].keys)
    assert torch.allclose(project(k29, math_pack.bases[(29, "k")][0]), k29, atol=1e-4)  # already in the subspace
    # layers the pack does not name are untouched by the hook (identical to the raw run below 15)
    assert torch.equal(hooked.layers[3].keys, raw.layers[3].keys)


def test_every_row_of_a_mixed_batch_equals_its_solo_run(hf_backend, modes):
    be = hf_backend
    mixed = [_req(be, PROMPTS[0]), _req(be, PROMPTS[1], ("t-math",)), _req(be, PROMPTS[2], ("t-rand",)),
             _req(be, PROMPTS[0], ("t-rand",), 0.5), _req(be, PROMPTS[1], ("t-math", "t-rand"))]
    together = be.generate(mixed)
    alone = [be.generate([r])[0] for r in mixed]
    for r, t, a in zip(mixed, together, alone):
        assert t.token_ids == a.token_ids, f"row {r.capability} differs in a mixed batch"
    # the modes change something: the random subspace diverts the math prompt's tokens
    base = be.generate([_req(be, PROMPTS[2])])[0]
    assert together[2].token_ids != base.token_ids


def test_unknown_capability_is_rejected_before_generating(hf_backend, modes):
    with pytest.raises(KeyError, match="unknown capability 'nope'.*t-math"):
        hf_backend.generate([_req(hf_backend, PROMPTS[0], ("nope",))])


def test_pack_for_another_model_is_refused_by_the_backend(hf_backend, modes, tiny_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from spd_engine import models
    from spd_engine.subspace import PackError

    tiny = AutoModelForCausalLM.from_pretrained(tiny_path)
    other = calibrate(tiny, tokenizer, models.info(tiny_path), "math",
                      [Example(id="a", prompt="1+1?", answer="2")], "t-tiny", CalibrationConfig(layers=[1]))
    with pytest.raises(PackError, match="was made for model"):
        hf_backend.add_subspace(other)
    assert "t-tiny" not in hf_backend.capabilities()
