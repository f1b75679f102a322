"""Request and response models at the HTTP boundary (FastAPI builds the OpenAPI schema from them)."""
from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from spd_engine.paths import check_name

Name = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: Literal[1] = Field(default=1, description="only n=1 is supported")
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    user: str | None = None
    ignore_eos: bool = Field(default=False, description="vLLM's extension: generate max_tokens tokens, past EOS")
    # SPD extensions (top-level fields; the openai client sends them through `extra_body`)
    capability: str | list[str] | None = Field(default=None, description="a capability mode, or a list to compose")
    capability_strength: float = Field(default=1.0, ge=0.0, le=1.0, description="projection strength alpha in [0, 1]")

    @field_validator("capability")
    @classmethod
    def _names(cls, v):
        if v is None:
            return v
        names = [v] if isinstance(v, str) else v
        for n in names:
            check_name(n, "capability name")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 non-empty stop strings")
        return v

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stops(self) -> tuple[str, ...]:
        return tuple([self.stop] if isinstance(self.stop, str) else (self.stop or []))

    def capability_names(self) -> list[str]:
        if self.capability is None:
            return []
        return [self.capability] if isinstance(self.capability, str) else list(self.capability)


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(description="a prompt (raw text, no chat template) or a list of prompts")
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("must not be an empty list")
        return v


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(p["text"])
        return "".join(parts)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @field_validator("messages")
    @classmethod
    def _texts(cls, v):
        for m in v:
            m.text()
        return v


class SPDInfo(BaseModel):
    capability: list[str]
    capability_strength: float
    adapter: str | None
    backend: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


# ---------------------------------------------------------------- subspaces, adapters, jobs

GranularityT = Literal["layer", "head"]
TaskKind = Literal["math", "mcq", "code", "custom"]


class DataSpec(_Strict):
    """Examples for a job: inline JSONL in the project schema, a list of rows, or a shared data set."""

    data: str | None = Field(default=None, description="JSONL text, one example per line (project schema)")
    examples: list[dict[str, Any]] | None = Field(default=None, description="examples as JSON objects (project schema)")
    dataset: str | None = Field(default=None, max_length=128, pattern=r"^(gsm8k|humaneval|bigbench(/[A-Za-z0-9_.-]+){1,2})$",
                                description="a shared data set: gsm8k, humaneval, bigbench/<task>[/<subtask>]")
    limit: int | None = Field(default=None, ge=1)


class CalibrationParams(_Strict):
    layers: list[int] | None = Field(default=None, min_length=1, description="default: middle and last layer")
    kinds: list[Literal["k", "v"]] = Field(default=["k", "v"], min_length=1)
    granularity: GranularityT = "layer"
    method: Literal["gradient", "random", "activation-pca"] = "gradient"
    rank: int | None = Field(default=None, ge=1)
    energy: float | None = Field(default=None, gt=0.0, le=1.0)


class SubspaceCreate(CalibrationParams):
    name: str = Name
    kind: TaskKind
    calibration: DataSpec


class AdapterLoad(_Strict):
    name: str = Name
    directory: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                                  description="a directory inside the server's adapters dir")
    job_id: str | None = Field(default=None, max_length=64, description="a succeeded distill or pipeline job")


class CalibrateJob(_Strict):
    kind: Literal["calibrate"]
    params: SubspaceCreate


class GenerateParams(_Strict):
    task_kind: TaskKind
    prompts: DataSpec
    capability: list[str] = Field(default_factory=list)
    strength: float = Field(default=1.0, ge=0.0, le=1.0)
    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    seed: int | None = None

    @field_validator("capability")
    @classmethod
    def _names(cls, v):
        for n in v:
            check_name(n, "capability name")
        return v


class DistillParams(_Strict):
    corpus_job: str = Field(max_length=64, description="a succeeded generate (or pipeline) job")
    adapter_name: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                                     description="hot-load the adapter under this name when done")
    epochs: int = Field(default=5, ge=1, le=100)
    lr: float = Field(default=1e-5, gt=0.0)
    lora_rank: int = Field(default=8, ge=1, le=256)
    lora_alpha: float = Field(default=8.0, gt=0.0)
    batch_size: int = Field(default=4, ge=1, le=256)
    max_length: int = Field(default=1024, ge=2)
    seed: int = 42


class EvaluateParams(_Strict):
    task_kind: TaskKind
    data: DataSpec
    capability: list[str] = Field(default_factory=list)
    strength: float = Field(default=1.0, ge=0.0, le=1.0)
    adapter: str | None = Field(default=None, max_length=64)
    max_tokens: int = Field(default=256, ge=1)


class PipelineParams(_Strict):
    name: str = Name
    task_kind: TaskKind
    calibration: DataSpec
    prompts: DataSpec
    eval_data: DataSpec | None = None
    calibration_params: CalibrationParams = Field(default_factory=CalibrationParams)
    strength: float = Field(default=1.0, ge=0.0, le=1.0)
    max_tokens: int = Field(default=256, ge=1)
    epochs: int = Field(default=5, ge=1, le=100)
    lr: float = Field(default=1e-5, gt=0.0)
    lora_rank: int = Field(default=8, ge=1, le=256)
    adapter_name: str | None = Field(default=None, min_length=1, max_length=64,
                                     pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class GenerateJob(_Strict):
    kind: Literal["generate"]
    params: GenerateParams


class DistillJob(_Strict):
    kind: Literal["distill"]
    params: DistillParams


class EvaluateJob(_Strict):
    kind: Literal["evaluate"]
    params: EvaluateParams


class PipelineJob(_Strict):
    kind: Literal["pipeline"]
    params: PipelineParams


JobCreate = Union[CalibrateJob, GenerateJob, DistillJob, EvaluateJob, PipelineJob]


class Job(BaseModel):
    id: str
    kind: str
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: float
    done: int
    total: int
    params: dict
    result: dict | None
    error: str | None
    created: float
    started: float | None
    finished: float | None
    artifact: str | None
