"""From examples to token ids: the prompt as the model sees it, and the answer with its span.

The prompt and the answer are tokenised separately and concatenated, exactly as in generation
(where the completion's tokens follow the prompt's), so a span found here is a span the model
really predicts. Character spans map to tokens through the tokenizer's offsets, which keeps an
answer that tokenises with a leading space (" 18" -> " ", "1", "8") on the right tokens.
"""
from __future__ import annotations

from .tasks import Example, Task, correctness_span, user_message


def uses_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def prompt_ids(tok, task: Task, ex: Example) -> list[int]:
    return text_prompt_ids(tok, user_message(task, ex))


def text_prompt_ids(tok, message: str) -> list[int]:
    """A user message as the model's prompt: through its chat template when it has one."""
    if uses_chat_template(tok):
        text = tok.apply_chat_template([{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False).input_ids  # the template already has them
    return tok(message).input_ids


def answer_ids(tok, answer: str, span: tuple[int, int] | None = None, eos: bool = False) -> tuple[list[int], list[bool]]:
    """The answer's token ids and, per token, whether it overlaps the character span."""
    enc = tok(answer, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc.input_ids)
    if span is None:
        mask = [False] * len(ids)
    else:
        s, e = span
        mask = [a < e and b > s for a, b in enc.offset_mapping]
    if eos:
        ids.append(tok.eos_token_id)
        mask.append(False)
    return ids, mask


def calibration_ids(tok, task: Task, ex: Example) -> tuple[list[int], list[int]]:
    """Prompt + gold answer ids, and the positions of the correctness-span tokens in them."""
    p = prompt_ids(tok, task, ex)
    a, mask = answer_ids(tok, ex.answer or "", correctness_span(task, ex))
    positions = [len(p) + i for i, m in enumerate(mask) if m]
    if not positions:
        raise ValueError(f"example {ex.id!r}: its correctness span covers no token")
    return p + a, positions
