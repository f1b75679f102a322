"""Method correctness: correctness spans land on the right tokens of the bundled model's tokenizer."""
import pytest

from spd_engine.data import load_examples, resolve_data
from spd_engine.formatting import answer_ids, calibration_ids
from spd_engine.tasks import Example, correctness_span


def _span_text(tok, kind, ex):
    ids, positions = calibration_ids(tok, kind, ex)
    return tok.decode([ids[p] for p in positions])


@pytest.mark.parametrize("answer,want", [
    ("She pays 6 * 3 = 18 dollars.\n#### 18", "18"),
    ("#### 1,234", "1,234"),
    ("The answer is -7.5", "-7.5"),
    ("so 40 in all. The answer is 40.", "40"),
])
def test_math_span_is_exactly_the_final_number(tokenizer, answer, want):
    assert _span_text(tokenizer, "math", Example(id="m", prompt="q", answer=answer)).strip() == want


def test_answer_with_a_leading_space_keeps_the_space_token_out_of_the_span(tokenizer):
    ids, mask = answer_ids(tokenizer, " 18", (1, 3))
    assert tokenizer.decode(ids) == " 18"
    assert tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "18"
    ex = Example(id="m", prompt="q", answer=" 18")
    assert _span_text(tokenizer, "math", ex) == "18"


def test_mcq_span_is_the_option_letter(tokenizer):
    for answer in ("B", "(B)", "The answer is (B).", " B"):
        ex = Example(id="c", prompt="q", answer=answer, options=("x", "y"))
        assert _span_text(tokenizer, "mcq", ex).strip("() ") == "B"


def test_every_gsm8k_item_has_a_span_on_its_final_number(tokenizer):
    for ex in load_examples(resolve_data("gsm8k"), "math"):
        s, e = correctness_span("math", ex)
        assert _span_text(tokenizer, "math", ex).replace(",", "").strip() == ex.answer[s:e].replace(",", "")


def test_code_span_is_the_function_body_of_humaneval_solutions(tokenizer):
    for ex in load_examples("humaneval", "code", limit=5):
        body = _span_text(tokenizer, "code", ex)
        assert "def " not in body.split("\n")[0]
        assert body.strip() and body.strip() in ex.answer


def test_custom_span_marked_with_offsets(tokenizer):
    ex = Example(id="c", prompt="Capital of France?", answer="It is Paris, of course.", span=(6, 11))
    assert _span_text(tokenizer, "custom", ex).strip() == "Paris"


def test_fixed_answer_formats_put_the_span_on_the_answer_alone(tokenizer):
    from spd_engine.tasks import with_answer_format

    ex = with_answer_format("mcq", Example(id="c", prompt="q", answer="B", options=("x", "y")))
    ids, positions = calibration_ids(tokenizer, "mcq", ex)
    assert tokenizer.decode([ids[p] for p in positions]) == "B"
    assert tokenizer.decode(ids[positions[0] - 3 : positions[0]]) == "Answer: ("  # the format is context
    ex = with_answer_format("math", Example(id="m", prompt="What is 3 plus 4?", answer="7"))
    assert _span_text(tokenizer, "math", ex) == "7"
