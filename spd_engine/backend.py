"""The backend interface: what the CLI, jobs and server need from an inference engine.

Two backends implement it: `hf` (transformers + peft, `hf_backend.py`) and `vllm`
(`spd_engine/vllm_backend.py`). Requests carry token ids, not text, so every backend sees exactly the
same tokens for the same prompt.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable, Literal

from .bank import Capability
from .models import ModelInfo
from .subspace import Subspace


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    capability: Capability = ()
    strength: float = 1.0
    adapter: str | None = None
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    ignore_eos: bool = False  # always produce max_tokens tokens (benchmarks: equal work per arm)

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {self.strength}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]  # generated tokens, without the end-of-sequence token
    finish_reason: Literal["stop", "length"]


Progress = Callable[[int], None]  # called with the number of requests just finished


class Backend(abc.ABC):
    name: str
    model_info: ModelInfo
    tokenizer: object

    @abc.abstractmethod
    def generate(self, requests: list[GenerationRequest], progress: Progress | None = None) -> list[Completion]:
        """Complete every request; requests may mix capabilities, strengths and adapters."""

    @abc.abstractmethod
    def add_subspace(self, pack: Subspace) -> None:
        """Make a capability mode usable by the next request (validated against the model)."""

    @abc.abstractmethod
    def remove_subspace(self, name: str) -> None: ...

    @abc.abstractmethod
    def capabilities(self) -> list[str]: ...

    @abc.abstractmethod
    def load_adapter(self, name: str, path: str) -> None: ...

    @abc.abstractmethod
    def unload_adapter(self, name: str) -> None: ...

    @abc.abstractmethod
    def adapters(self) -> list[str]: ...

    def close(self) -> None:
        """Release the engine (processes, memory)."""
