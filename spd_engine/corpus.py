"""Phase 2a: hooked self-generation -> a corpus of (prompt, completion) pairs, JSONL.

One completion per prompt, with the capability mode active. Every row carries its provenance.
Generation is resumable: rows already in the file are kept and their prompts skipped; a line cut
short by a crash is dropped. Rows are appended and flushed chunk by chunk.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from .backend import Backend, GenerationRequest
from .data import DataError, jsonl_rows
from .formatting import text_prompt_ids
from .tasks import Example, Task, stop_strings, user_message


def read_corpus(path: Path, *, repair: bool = False) -> list[dict]:
    """Rows of a corpus file. A torn last line (no newline) is dropped, and with `repair` also
    cut from the file; any other bad line is a DataError naming the line."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    good_end = raw.rfind(b"\n") + 1  # everything after the last newline is a torn write
    rows = []
    for n, row in jsonl_rows(path, raw[:good_end].decode("utf-8"), allow_empty=True):
        if not all(isinstance(row.get(k), str) for k in ("id", "prompt", "completion")):
            raise DataError(f"{path}:{n}: a corpus row needs string fields id, prompt, completion")
        rows.append(row)
    if repair and good_end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return rows


def _renamed(provenance):
    """A corpus provenance as this version writes it: before issue 23 the task was `kind`."""
    if isinstance(provenance, dict) and "kind" in provenance and "task" not in provenance:
        return {("task" if k == "kind" else k): v for k, v in provenance.items()}
    return provenance


def generate_corpus(backend: Backend, task: Task, examples: list[Example], out: Path, *,
                    capability: tuple[str, ...] = (), strength: float = 1.0, max_tokens: int = 256,
                    temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                    stop: list[str] | None = None, chunk: int = 32,
                    progress: Callable[[int], None] | None = None) -> dict:
    """Write one completion per example to `out` (appending to a partial run); return counts."""
    out = Path(out)
    stop = stop_strings(task) if stop is None else stop
    provenance = {
        "model": str(backend.model_info.path), "model_identity": backend.model_info.identity,
        "backend": backend.name, "capability": list(capability), "strength": strength if capability else 0.0,
        "decoding": {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "seed": seed, "stop": stop},
        "task": task,
    }
    done_rows = read_corpus(out, repair=True)
    for row in done_rows[:1]:
        if _renamed(row.get("provenance")) != provenance:
            raise DataError(f"{out} was generated with other settings ({row.get('provenance')}); use a new file")
    done = {r["id"] for r in done_rows}
    todo = [ex for ex in examples if ex.id not in done]
    if progress and done:
        progress(len(examples) - len(todo))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            messages = [user_message(task, ex) for ex in part]
            reqs = [GenerationRequest(text_prompt_ids(backend.tokenizer, m), capability=capability, strength=strength,
                                      max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                      stop=tuple(stop)) for m in messages]
            # progress(0) while the chunk runs: nothing is counted until its rows are written, but a
            # caller that wants to stop (a cancelled job) can raise from it
            alive = (lambda n: progress(0)) if progress else None
            for ex, m, c in zip(part, messages, backend.generate(reqs, progress=alive)):
                row = {"id": ex.id, "prompt": m, "completion": c.text, "finish_reason": c.finish_reason,
                       "n_tokens": len(c.token_ids), "provenance": provenance}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            if progress:
                progress(len(part))
    return {"written": len(todo), "skipped": len(examples) - len(todo), "total": len(examples), "path": str(out)}
