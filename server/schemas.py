"""Request models of the resource routes (subspaces, jobs, adapters); FastAPI builds their OpenAPI
schema. The OpenAI routes and their models are vLLM's own."""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from spd_engine.subspace import check_mode_name


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # the same rule as spd_engine.paths.check_name
Name = Field(min_length=1, max_length=64, pattern=NAME_PATTERN)
ModeName = Annotated[str, Field(min_length=1, max_length=64, pattern=NAME_PATTERN)]


def _exactly_one(*fields: str) -> dict:
    """JSON schema: exactly one of `fields` is given (and not null)."""
    return {"oneOf": [{"required": [f], "properties": {f: {"not": {"type": "null"}}}} for f in fields]}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- subspaces, adapters, jobs

GranularityT = Literal["layer", "head"]
TaskKind = Literal["math", "mcq", "code", "custom"]


class DataSpec(_Strict):
    """Examples for a job: inline JSONL in the project schema, a list of rows, or a shared data set."""

    data: str | None = Field(default=None, description="JSONL text, one example per line (project schema)")
    examples: list[dict[str, Any]] | None = Field(default=None, description="examples as JSON objects (project schema)")
    dataset: str | None = Field(default=None, max_length=128,
                                pattern=r"^(gsm8k|humaneval|bigbench(/[A-Za-z0-9_][A-Za-z0-9_.-]*){1,2})$",
                                description="a shared data set: gsm8k, humaneval, bigbench/<task>[/<subtask>]")
    limit: int | None = Field(default=None, ge=1)

    model_config = ConfigDict(extra="forbid", json_schema_extra=_exactly_one("data", "examples", "dataset"))

    @model_validator(mode="after")
    def _one_source(self):
        if sum(v is not None for v in (self.data, self.examples, self.dataset)) != 1:
            raise ValueError("give exactly one of 'data' (JSONL text), 'examples' (list) or 'dataset'")
        return self


class CalibrationParams(_Strict):
    layers: list[int] | None = Field(default=None, min_length=1, description="default: middle and last layer")
    kinds: list[Literal["k", "v"]] = Field(default=["k", "v"], min_length=1)
    granularity: GranularityT = "layer"
    method: Literal["gradient", "random", "activation-pca"] = "gradient"
    rank: int | None = Field(default=None, ge=1)
    energy: float | None = Field(default=None, gt=0.0, le=1.0)


class SubspaceCreate(CalibrationParams):
    name: str = Name

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        return check_mode_name(v)
    kind: TaskKind
    calibration: DataSpec


class AdapterLoad(_Strict):
    name: str = Name
    directory: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                                  description="a directory inside the server's adapters dir")
    job_id: str | None = Field(default=None, max_length=64, pattern=NAME_PATTERN,
                               description="a succeeded distill or pipeline job")

    model_config = ConfigDict(extra="forbid", json_schema_extra=_exactly_one("directory", "job_id"))

    @model_validator(mode="after")
    def _one_source(self):
        if (self.directory is None) == (self.job_id is None):
            raise ValueError("give exactly one of 'directory' or 'job_id'")
        return self


class CalibrateJob(_Strict):
    kind: Literal["calibrate"]
    params: SubspaceCreate


class GenerateParams(_Strict):
    task_kind: TaskKind
    prompts: DataSpec
    capability: list[ModeName] = Field(default_factory=list, max_length=8)
    strength: float = Field(default=1.0, ge=0.0, le=1.0)
    max_tokens: int = Field(default=256, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)  # bounds exact in JSON (a float) too


class DistillParams(_Strict):
    corpus_job: str = Field(max_length=64, pattern=NAME_PATTERN, description="a succeeded generate (or pipeline) job")
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
    capability: list[ModeName] = Field(default_factory=list, max_length=8)
    strength: float = Field(default=1.0, ge=0.0, le=1.0)
    adapter: str | None = Field(default=None, max_length=64, pattern=NAME_PATTERN)
    max_tokens: int = Field(default=256, ge=1, le=4096)


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
    controls: list[Literal["self-distill"]] = Field(
        default_factory=list, max_length=1,
        description="control arms run beside spd: 'self-distill' is the same pipeline without the projection "
                    "(generation unprojected, the same distillation settings and seed), loaded as ADAPTER-self-distill")


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
