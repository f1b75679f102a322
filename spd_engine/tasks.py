"""Tasks (math, mcq, code, custom): how a prompt is shown to the model, which answer tokens decide correctness,
and how a completion is scored.

A task answers four questions about an `Example`:
  * `user_message`      - the text the model is asked (before any chat template);
  * `correctness_span`  - character offsets, inside the gold answer, of the tokens whose
                          prediction decides correctness (the calibration loss uses only these);
  * `extract`           - the answer a completion gives (None when it gives none);
  * `score`             - whether a completion is correct.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Literal, Sequence

Task = Literal["math", "mcq", "code", "custom"]
TASKS: tuple[str, ...] = ("math", "mcq", "code", "custom")
# tasks whose answer is a short value `extract` pulls out (a number, a letter), not a whole text
SHORT_ANSWER_TASKS: tuple[str, ...] = ("math", "mcq")
# the names before "task" was the one word (issue 23): kept for one release, for importers not yet renamed
Kind, KINDS, SHORT_ANSWER_KINDS = Task, TASKS, SHORT_ANSWER_TASKS

# Delimiters a `custom` answer may use to mark its correctness span instead of offsets.
SPAN_OPEN, SPAN_CLOSE = "[[", "]]"

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Where an mcq text states its letter, most explicit first; the gold span and `extract` share them.
#   1. a stated answer: "The answer is (C)", "Answer: C", "The correct option is D.", "best choice: B"
#   2. a parenthesised letter anywhere: "I think (C)", "(B) because ..."
#   3. a letter standing alone at the start of a line: "C", "C.", "C)", "C: ..." - never a capital that
#      starts a sentence ("I think ...", "A date 10 days ago ...")
# A letter must be a capital that is not part of a word (the "A" of "All" never counts).
_MCQ_PATTERNS = (
    r"(?i:answer|(?:correct|right|best)\s+(?:option|choice))(?:\s+(?i:is|would\s+be|should\s+be))?\s*:?\s*"
    r"\(?([A-Z])(?![\w'])",
    r"\(([A-Z])\)",
    r"^[ \t]*([A-Z])(?:[.):](?!\w)|[ \t]*$)",
)
# The fixed answer formats that teacher-forced scoring puts before the scored span (see
# `with_answer_format`): the span is then the answer alone, never the format of the answer.
MCQ_ANSWER_PREFIX = "Answer: ("
MATH_ANSWER_PREFIX = "The answer is "


@dataclass(frozen=True)
class Example:
    """One item of a data set. `answer` is the gold completion (None for bare generation prompts);
    `span` are character offsets of the correctness span inside `answer` (None: the task finds it)."""

    id: str
    prompt: str
    answer: str | None = None
    span: tuple[int, int] | None = None
    tests: str | None = None  # code: test source defining `check(candidate)`
    entry_point: str | None = None  # code: the function the tests call
    options: tuple[str, ...] = field(default=())  # mcq: option texts, lettered A, B, ...


class TaskError(ValueError):
    """An example that the task cannot handle (no span, no tests, ...)."""


def check_task(task: str) -> Task:
    if task not in TASKS:
        raise TaskError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    return task  # type: ignore[return-value]


def letter(i: int) -> str:
    return _LETTERS[i]


# ---------------------------------------------------------------- prompt text


def user_message(task: Task, ex: Example) -> str:
    if task == "mcq" and ex.options:
        opts = "\n".join(f"({letter(i)}) {o}" for i, o in enumerate(ex.options))
        return f"{ex.prompt}\nOptions:\n{opts}\nAnswer with the letter of the correct option."
    if task == "math":
        return f"{ex.prompt}\nSolve step by step and end with '#### <number>'."
    if task == "code":
        return f"Complete this Python function. Reply with the whole function in a code block.\n\n{ex.prompt}"
    return ex.prompt


def stop_strings(task: Task) -> list[str]:
    """Truncation-based decoding: where a completion of this task ends (beyond EOS)."""
    return {"math": ["\n\n\n"], "mcq": ["\n\n"], "code": ["\n```\n", "\nif __name__"], "custom": []}[task]


# ---------------------------------------------------------------- correctness span


def correctness_span(task: Task, ex: Example) -> tuple[int, int]:
    """Character offsets [start, end) of the correctness span inside `ex.answer`."""
    if ex.answer is None:
        raise TaskError(f"example {ex.id!r} has no gold answer, so it has no correctness span")
    a = ex.answer
    if ex.span is not None:
        s, e = ex.span
        if not (0 <= s < e <= len(a)):
            raise TaskError(f"example {ex.id!r}: span {ex.span} is outside its answer (length {len(a)})")
        return s, e
    if task == "math":
        m = None
        for pat in (rf"####\s*({_NUMBER})", rf"answer is\s*:?\s*({_NUMBER})"):
            m = re.search(pat, a, flags=re.IGNORECASE)
            if m:
                break
        if m is None:
            matches = list(re.finditer(_NUMBER, a))
            m = matches[-1] if matches else None
            if m is None:
                raise TaskError(f"example {ex.id!r}: math answer has no number: {a[:60]!r}")
            return m.start(), m.end()
        return m.start(1), m.end(1)
    if task == "mcq":
        m = _mcq_letter(a, len(ex.options) or None)
        if m is None:
            raise TaskError(f"example {ex.id!r}: mcq answer has no option letter: {a[:60]!r}")
        return m.start(1), m.end(1)
    if task == "code":
        body = code_body_offsets(a)
        if body is None:
            raise TaskError(f"example {ex.id!r}: code answer has no function body")
        return body
    raise TaskError(
        f"example {ex.id!r}: a custom answer needs a span (offsets, or {SPAN_OPEN}...{SPAN_CLOSE} in the answer)"
    )


def code_body_offsets(answer: str) -> tuple[int, int] | None:
    """The solution body: after the last outermost `def ...:` line (a helper nested inside the solution
    is part of the body), else the whole non-blank answer."""
    defs = list(re.finditer(r"^([ \t]*)def [^\n]*:[ \t]*\n", answer, flags=re.MULTILINE))
    outer = min((len(m.group(1)) for m in defs), default=0)
    outermost = [m for m in defs if len(m.group(1)) == outer]
    start = outermost[-1].end() if outermost else 0
    # skip a docstring right after the signature: it restates the prompt, not the solution
    doc = re.match(r'[ \t]*("""|\'\'\')(.*?)\1[ \t]*\n', answer[start:], flags=re.DOTALL)
    if doc:
        start += doc.end()
    end = len(answer.rstrip())
    fence = answer.rfind("```", start)
    if fence != -1:
        end = len(answer[:fence].rstrip())
    while start < end and answer[start] in "\n":
        start += 1
    return (start, end) if start < end else None


def split_span_markers(answer: str) -> tuple[str, tuple[int, int] | None]:
    """`custom` data may mark the span inline as [[...]]: return the clean answer and the span."""
    s = answer.find(SPAN_OPEN)
    if s == -1:
        return answer, None
    e = answer.find(SPAN_CLOSE, s + len(SPAN_OPEN))
    if e == -1:
        raise TaskError(f"answer has {SPAN_OPEN} without {SPAN_CLOSE}")
    clean = answer[:s] + answer[s + len(SPAN_OPEN) : e] + answer[e + len(SPAN_CLOSE) :]
    if e - s - len(SPAN_OPEN) <= 0:
        raise TaskError("the marked span is empty")
    return clean, (s, e - len(SPAN_OPEN))


# ---------------------------------------------------------------- extraction and scoring


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").replace("$", ""))
    except ValueError:
        return None


def _mcq_letter(text: str, n_options: int | None = None) -> re.Match | None:
    """The match of the letter a text states (pattern order above; the first match of a pattern wins),
    skipping letters beyond the `n_options` options."""
    for pat in _MCQ_PATTERNS:
        for m in re.finditer(pat, text, flags=re.MULTILINE):
            if n_options is None or _LETTERS.index(m.group(1)) < n_options:
                return m
    return None


def with_answer_format(task: Task, ex: Example) -> Example:
    """The example with its gold answer in a fixed answer format, span on the answer alone:
    mcq `B` -> `Answer: (B)` (span `B`), a math answer that is a bare number `109` ->
    `The answer is 109.` (span `109`). Teacher-forced measures (span NLL, calibration) then score
    the answer after the format rather than the format itself: a model that starts its replies with
    "(" or "The" otherwise pays for the format in the span NLL, and training on "(D)"-style corpora
    moves it whatever the correctness. Other answers (GSM8K reasoning, code, custom) are kept."""
    if ex.answer is None:
        return ex
    if task == "mcq":
        s, e = correctness_span(task, ex)
        if ex.answer.strip() == ex.answer[s:e]:
            gold = f"{MCQ_ANSWER_PREFIX}{ex.answer[s:e]})"
            return replace(ex, answer=gold, span=(len(MCQ_ANSWER_PREFIX), len(MCQ_ANSWER_PREFIX) + e - s))
    if task == "math" and re.fullmatch(_NUMBER, ex.answer.strip()):
        number = ex.answer.strip()
        gold = f"{MATH_ANSWER_PREFIX}{number}."
        return replace(ex, answer=gold, span=(len(MATH_ANSWER_PREFIX), len(MATH_ANSWER_PREFIX) + len(number)))
    return ex


def extract(task: Task, completion: str, n_options: int | None = None) -> str | None:
    """The answer a completion gives; for mcq only letters of the first `n_options` options count."""
    if task == "math":
        for pat in (rf"####\s*({_NUMBER})", rf"answer is\s*:?\s*({_NUMBER})"):
            m = re.search(pat, completion, flags=re.IGNORECASE)
            if m:
                return m.group(1).replace(",", "").replace("$", "")
        nums = re.findall(_NUMBER, completion)
        return nums[-1].replace(",", "").replace("$", "") if nums else None
    if task == "mcq":
        m = _mcq_letter(completion, n_options)
        return None if m is None else m.group(1)
    if task == "code":
        blocks = re.findall(r"```(?:python)?\n(.*?)(?:```|$)", completion, flags=re.DOTALL)
        return blocks[0] if blocks else completion
    return completion.strip()


def score(task: Task, ex: Example, completion: str, timeout: float = 10.0) -> bool:
    got = extract(task, completion, len(ex.options) or None)
    if got is None:
        return False
    if task == "math":
        s, e = correctness_span(task, ex)
        want, have = _number(ex.answer[s:e]), _number(got)  # type: ignore[index]
        return want is not None and have is not None and abs(want - have) < 1e-6
    if task == "mcq":
        s, e = correctness_span(task, ex)
        return got == ex.answer[s:e]  # type: ignore[index]
    if task == "code":
        from .sandbox import run_tests

        if not ex.tests or not ex.entry_point:
            raise TaskError(f"example {ex.id!r}: code scoring needs tests and an entry point")
        return run_tests(code_program(ex, got), ex.tests, ex.entry_point, timeout=timeout)
    s, e = correctness_span(task, ex)
    return " ".join(ex.answer[s:e].split()).lower() in " ".join(got.split()).lower()  # type: ignore[index]


def code_program(ex: Example, code: str) -> str:
    """The program a code completion is tested as. A completion that gives only the body continues the
    prompt. One that defines the entry point itself still runs after the prompt's preamble - its
    imports and helper functions, everything before `def <entry point>` - which it may leave out
    (HumanEval/6 needs the prompt's `from typing import List`); its own definitions come later and win."""
    assert ex.entry_point is not None
    definition = rf"def\s+{re.escape(ex.entry_point)}\s*\("
    if not re.search(definition, code):
        return ex.prompt + code
    head = re.search(rf"^{definition}", ex.prompt, flags=re.MULTILINE)
    preamble = ex.prompt[: head.start()] if head else ""
    return f"{preamble.rstrip()}\n\n\n{code}" if preamble.strip() else code


def accuracy_interval(hits: Sequence[bool], z: float = 1.96) -> tuple[float, float, float]:
    """Accuracy with a Wilson 95% interval (sound near 0 and 1, unlike the normal interval)."""
    n = len(hits)
    if n == 0:
        return 0.0, 0.0, 0.0
    p = sum(hits) / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom
    return p, max(0.0, centre - half), min(1.0, centre + half)
