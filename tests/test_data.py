"""Data loaders, the code sandbox, and scoring of the task kinds, on the real shared data."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pytest

from spd_engine.data import DataError, data_dir, data_sha256, load_examples, resolve_data
from spd_engine.sandbox import run_tests
from spd_engine.tasks import Example, correctness_span, extract, score

BIGBENCH_MCQ_FILES = sorted(
    p.stem
    for p in (data_dir() / "bigbench").glob("*.json")
    # these two have examples with several best options (circle/ellipse, '3'/'three'), which load refuses
    if p.stem not in ("geometric_shapes", "reasoning_about_colored_objects")
)
CHECK_DOUBLES = "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(-3) == -6\n"


def write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def humaneval() -> dict[str, Example]:
    return {ex.id: ex for ex in load_examples("humaneval", "code")}


# ---------------------------------------------------------------- GSM8K


def test_gsm8k_loader_reads_all_100_real_items_with_final_number_span() -> None:
    path = resolve_data("gsm8k")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    examples = load_examples(path, "math")
    assert len(examples) == len(rows) == 100
    for ex, row in zip(examples, rows):
        assert (ex.id, ex.prompt, ex.answer) == (row["id"], row["question"], row["answer"])
        s, e = correctness_span("math", ex)
        assert float(ex.answer[s:e].replace(",", "")) == float(row["final"])
        assert score("math", ex, f"Working...\n#### {row['final']}")


def test_gsm8k_final_that_disagrees_with_the_answer_is_rejected(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "g.jsonl", [{"id": "a", "question": "1+1?", "answer": "1+1=2\n#### 2", "final": "3"}])
    with pytest.raises(DataError, match=r"g\.jsonl:1: field 'final' '3'"):
        load_examples(path, "math")


def test_gsm8k_answer_must_end_with_the_hashes_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "1+1?", "answer": "It is 2."}])
    with pytest.raises(DataError, match=r"g\.jsonl:1: field 'answer' must end with a line '#### <number>'"):
        load_examples(path, "math")


def test_gsm8k_data_loads_only_as_kind_math() -> None:
    with pytest.raises(DataError, match="loads as task 'math', not 'mcq'"):
        load_examples(resolve_data("gsm8k"), "mcq")


# ---------------------------------------------------------------- project JSONL


def test_malformed_jsonl_line_is_reported_with_file_and_line_number(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "a"}, "", {"prompt": "b"}, '{"prompt": "c",'])
    with pytest.raises(DataError, match=rf"^{path}:4: invalid JSON"):
        load_examples(path, "custom")


def test_unknown_field_is_rejected(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "a"}, {"prompt": "b", "anwser": "x"}])
    with pytest.raises(DataError, match=r"data\.jsonl:2: unknown field\(s\) 'anwser'"):
        load_examples(path, "custom")


@pytest.mark.parametrize(
    "row, field",
    [
        ({"prompt": 3}, "prompt"),
        ({"prompt": "  "}, "prompt"),
        ({"prompt": "p", "id": ["x"]}, "id"),
        ({"prompt": "p", "id": True}, "id"),
        ({"prompt": "p", "answer": 5}, "answer"),
        ({"prompt": "p", "answer": "abc", "span": [0, "2"]}, "span"),
        ({"prompt": "p", "answer": "abc", "span": [0, 1, 2]}, "span"),
        ({"prompt": "p", "tests": 1, "entry_point": "f"}, "tests"),
    ],
)
def test_wrong_field_type_is_reported_with_the_field_name(tmp_path: Path, row: dict, field: str) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [row])
    with pytest.raises(DataError, match=rf"data\.jsonl:1: field '{field}'"):
        load_examples(path, "custom")


def test_project_jsonl_ids_default_to_file_stem_and_line_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mine.jsonl", [{"prompt": "a"}, "   ", {"prompt": "b", "id": 7}])
    assert [(ex.id, ex.prompt) for ex in load_examples(path, "custom")] == [("mine-1", "a"), ("7", "b")]


def test_duplicate_ids_are_rejected(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "id": "x"}, {"prompt": "b", "id": "x"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: duplicate id 'x' \(first on line 1\)"):
        load_examples(path, "custom")


def test_span_outside_the_answer_is_rejected(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "answer": "abc", "span": [1, 4]}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'span' \[1, 4\] must satisfy"):
        load_examples(path, "custom")


def test_tests_without_entry_point_are_rejected(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "tests": CHECK_DOUBLES}])
    with pytest.raises(DataError, match="'tests' and 'entry_point' must be given together"):
        load_examples(path, "code")


def test_custom_answer_marks_its_span_inline_with_double_brackets(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "Capital of France?", "answer": "It is [[Paris]]."}])
    [ex] = load_examples(path, "custom")
    assert ex.answer == "It is Paris." and ex.span == (6, 11)
    assert ex.answer[slice(*correctness_span("custom", ex))] == "Paris"


@pytest.mark.parametrize(
    "answer, message",
    [
        ("It is Paris.", "a custom answer needs a span"),
        ("It is [[Paris.", "without ]]"),
        ("[[It]] is [[Paris]].", r"more than one \[\[...\]\] span"),
    ],
)
def test_custom_answer_without_one_clear_span_is_rejected_at_load_time(
    tmp_path: Path, answer: str, message: str
) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "answer": answer}])
    with pytest.raises(DataError, match=rf"c\.jsonl:1: .*{message}"):
        load_examples(path, "custom")


def test_missing_source_is_reported_by_name(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=rf"^{missing}: no such file"):
        load_examples(missing, "math")


def test_limit_keeps_the_first_n_examples() -> None:
    full = load_examples(resolve_data("gsm8k"), "math")
    assert load_examples(resolve_data("gsm8k"), "math", limit=5) == full[:5]


# ---------------------------------------------------------------- BIG-bench


@pytest.mark.parametrize("task", BIGBENCH_MCQ_FILES)
def test_bigbench_mcq_answer_letter_matches_the_option_with_score_1(task: str) -> None:
    path = resolve_data(f"bigbench/{task}")
    raw = json.loads(path.read_text(encoding="utf-8"))["examples"]
    examples = load_examples(path, "mcq")
    assert len(examples) == len(raw)
    for i, (ex, row) in enumerate(zip(examples, raw)):
        assert ex.id == f"{task}-{i}" and ex.prompt.endswith(row["input"])
        assert sorted(ex.options) == sorted(row["target_scores"])  # same options, shuffled
        assert row["target_scores"][ex.options[ord(ex.answer) - ord("A")]] == 1
        assert score("mcq", ex, f"The answer is ({ex.answer}).")


def test_scored_completions_record_the_extracted_answer_and_a_wilson_interval() -> None:
    from spd_engine.evaluate import score_completions

    examples = load_examples(resolve_data("bigbench/date_understanding"), "mcq", limit=4)
    wrong = "B" if examples[1].answer != "B" else "C"
    r = score_completions("mcq", examples[:2], [f"({examples[0].answer}) it is", f"The answer is ({wrong})."])
    assert (r.value, r.n) == (0.5, 2) and 0 < r.ci_low < 0.5 < r.ci_high < 1
    assert [it["answer"] for it in r.items] == [examples[0].answer, wrong]
    assert [it["correct"] for it in r.items] == [True, False]
    with pytest.raises(ValueError):
        score_completions("mcq", examples, ["(A)"])  # one completion per example


def test_bigbench_task_prefix_is_part_of_the_prompt() -> None:
    [ex] = load_examples(resolve_data("bigbench/navigate"), "mcq", limit=1)
    assert ex.prompt.startswith("If you follow these instructions, do you return to the starting point?\n")


def test_bigbench_example_without_a_single_best_option_is_rejected_with_its_index() -> None:
    with pytest.raises(DataError, match=r"geometric_shapes\.json: examples\[12\]: needs exactly one best option"):
        load_examples(resolve_data("bigbench/geometric_shapes"), "mcq")


def test_bigbench_example_with_more_than_26_options_is_rejected(tmp_path: Path) -> None:
    scores = {f"option {i}": int(i == 0) for i in range(27)}
    path = tmp_path / "task.json"
    path.write_text(json.dumps({"examples": [{"input": "q", "target_scores": scores}]}), encoding="utf-8")
    with pytest.raises(DataError, match=r"examples\[0\]: 27 options"):
        load_examples(path, "mcq")


def test_bigbench_arithmetic_loads_as_math_with_the_scored_number_as_answer() -> None:
    path = resolve_data("bigbench/arithmetic/3_digit_subtraction")
    raw = json.loads(path.read_text(encoding="utf-8"))["examples"]
    examples = load_examples(path, "math")
    assert [ex.answer for ex in examples] == [row["target"] for row in raw]
    assert examples[0].prompt == "What is 141 minus 906?" and examples[0].answer == "-765"
    assert score("math", examples[0], "141 - 906 = -765") and not score("math", examples[0], "#### 765")


# ---------------------------------------------------------------- HumanEval, locations, hashes


def test_humaneval_loads_164_problems_whose_answer_is_prompt_plus_solution(humaneval: dict[str, Example]) -> None:
    assert len(humaneval) == 164
    ex = humaneval["HumanEval/0"]
    assert ex.entry_point == "has_close_elements" and "def check(candidate)" in (ex.tests or "")
    assert ex.answer is not None and ex.answer.startswith(ex.prompt) and len(ex.answer) > len(ex.prompt)


def test_humaneval_correctness_span_is_the_canonical_solution_even_with_nested_helpers(
    humaneval: dict[str, Example],
) -> None:
    for task_id in ("HumanEval/0", "HumanEval/6", "HumanEval/107"):  # 6 and 107 define a helper inside
        ex = humaneval[task_id]
        s, e = correctness_span("code", ex)
        assert ex.answer is not None and (s, e) == (len(ex.prompt), len(ex.answer.rstrip()))


def test_resolve_data_maps_short_names_into_the_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SPD_DATA_DIR", raising=False)
    assert data_dir() == Path(__file__).resolve().parents[2] / "shared" / "data"
    monkeypatch.setenv("SPD_DATA_DIR", str(tmp_path))
    assert resolve_data("gsm8k") == tmp_path / "gsm8k_test100.jsonl"
    assert resolve_data("bigbench/snarks") == tmp_path / "bigbench" / "snarks.json"
    arithmetic = tmp_path / "bigbench" / "arithmetic" / "2_digit_addition.json"
    assert resolve_data("bigbench/arithmetic/2_digit_addition") == arithmetic
    assert resolve_data("elsewhere/my.jsonl") == Path("elsewhere/my.jsonl")


def test_data_sha256_hashes_the_file_bytes(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_bytes(b"abc")
    assert data_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert len(data_sha256("humaneval")) == 64


# ---------------------------------------------------------------- sandbox


@pytest.mark.parametrize("task_id", ["HumanEval/0", "HumanEval/6", "HumanEval/32", "HumanEval/107", "HumanEval/163"])
def test_humaneval_canonical_solution_passes_its_tests_in_the_sandbox(
    humaneval: dict[str, Example], task_id: str
) -> None:
    ex = humaneval[task_id]
    assert ex.answer and ex.tests and ex.entry_point
    assert run_tests(ex.answer, ex.tests, ex.entry_point)
    # score() prepends the prompt when the completion gives only the body
    assert score("code", ex, f"```python\n{ex.answer[len(ex.prompt):]}```")


def test_wrong_solution_fails_in_the_sandbox(humaneval: dict[str, Example]) -> None:
    assert not run_tests("def double(x):\n    return x + 2\n", CHECK_DOUBLES, "double")
    ex = humaneval["HumanEval/0"]
    assert not score("code", ex, f"```python\n{ex.prompt}    return False\n```")


def test_infinite_loop_is_killed_by_timeout() -> None:
    start = time.monotonic()
    assert not run_tests("def double(x):\n    while True:\n        pass\n", CHECK_DOUBLES, "double", timeout=1.0)
    assert time.monotonic() - start < 5


def test_sandbox_cannot_delete_files_outside_its_temp_dir(tmp_path: Path) -> None:
    victim_dir = tmp_path / "keep"
    victim_dir.mkdir()
    victim = victim_dir / "precious.txt"
    victim.write_text("data")
    for attack in (
        f"import os\nos.remove({str(victim)!r})",
        f"import os\nos.unlink({str(victim)!r})",
        f"import pathlib\npathlib.Path({str(victim)!r}).unlink()",
        f"import shutil\nshutil.rmtree({str(victim_dir)!r})",
        f"import subprocess\nsubprocess.run(['rm', '-rf', {str(victim_dir)!r}])",
        f"import os\nos.system('rm -rf {victim_dir}')",
    ):
        assert not run_tests(f"{attack}\ndef double(x):\n    return 2 * x\n", CHECK_DOUBLES, "double")
        assert victim.read_text() == "data", attack


@pytest.mark.parametrize("early_exit", ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit"])
def test_program_that_exits_with_status_0_before_the_tests_does_not_pass(early_exit: str) -> None:
    assert not run_tests(f"def double(x):\n    return 0\n{early_exit}\n", CHECK_DOUBLES, "double")


def test_sandbox_runs_in_a_fresh_temp_dir_that_is_removed_afterwards(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    program = "import os\nassert sorted(os.listdir('.')) == ['output.txt', 'program.py']\ndouble = lambda x: 2 * x\n"
    assert run_tests(program, CHECK_DOUBLES, "double")
    assert list(tmp_path.iterdir()) == []


def test_sandbox_child_inherits_only_path_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPD_SECRET", "x")
    program = "import os\nassert 'SPD_SECRET' not in os.environ and 'PATH' in os.environ\ndouble = lambda x: 2 * x\n"
    assert run_tests(program, CHECK_DOUBLES, "double")


@pytest.mark.parametrize(
    "hog",
    ["block = bytearray(3 * 1024**3)", "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)"],
    ids=["memory", "output"],
)
def test_memory_and_output_hogs_are_stopped_by_resource_limits(hog: str) -> None:
    assert not run_tests(f"{hog}\ndouble = lambda x: 2 * x\n", CHECK_DOUBLES, "double")


# ---------------------------------------------------------------- scoring of the task kinds


def test_math_score_reads_the_final_number_in_its_usual_forms() -> None:
    ex = Example(id="m", prompt="p", answer="5 * 200 = 1000 dollars.\n#### 1,000")
    assert ex.answer[slice(*correctness_span("math", ex))] == "1,000"
    for completion in ("so #### 1000", "The answer is: $1,000", "It costs 999 + 1 = 1000"):
        assert extract("math", completion) == "1000" and score("math", ex, completion), completion
    assert not score("math", ex, "#### 1001")
    assert not score("math", ex, "no idea")


def test_mcq_gold_answer_in_prose_scores_as_correct() -> None:
    ex = Example(id="q", prompt="p", answer="The answer is (B).", options=("x", "y"))
    assert ex.answer[slice(*correctness_span("mcq", ex))] == "B"
    assert score("mcq", ex, ex.answer)


@pytest.mark.parametrize(
    "completion, correct",
    [("B", True), ("(B) because y", True), ("The answer is B", True), ("The answer is (C)", False), ("unsure", False)],
)
def test_mcq_score_compares_the_extracted_letter(completion: str, correct: bool) -> None:
    ex = Example(id="q", prompt="p", answer="B", options=("x", "y", "z"))
    assert score("mcq", ex, completion) is correct


def test_custom_score_looks_for_the_marked_span_in_the_completion(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "Capital of France?", "answer": "It is [[Paris]]."}])
    [ex] = load_examples(path, "custom")
    assert score("custom", ex, "Definitely  PARIS, of course")
    assert not score("custom", ex, "Lyon")


def test_bigbench_gold_letters_are_spread_over_the_options_not_always_the_first():
    """BIG-bench lists the correct option first in many tasks; the loader must not keep that order."""
    examples = load_examples(resolve_data("bigbench/date_understanding"), "mcq")
    letters = {ex.answer for ex in examples}
    assert len(letters) >= 4
    assert max(sum(ex.answer == x for ex in examples) for x in letters) < 0.5 * len(examples)
    again = load_examples(resolve_data("bigbench/date_understanding"), "mcq")
    assert [ex.options for ex in again] == [ex.options for ex in examples]  # reproducible
