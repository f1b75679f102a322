"""Request models of the resource routes (modes, jobs, adapters); FastAPI builds their OpenAPI
schema. The OpenAI routes and their models are vLLM's own.

Fields renamed in issue 23 (one word per concept) keep their previous spelling for one release
(deprecated, removed in the next): a request or a stored job record that uses it still validates,
and the routes answer it with a `Deprecation` header. Each model states its renames in `renamed`."""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from spd_engine.config import (CalibrationConfig, DistillConfig, EvaluationConfig, GenerationConfig, PipelineConfig,
                               TaskField)
from spd_engine.paths import NAME_PATTERN
from spd_engine.subspace import check_mode_name

Name = Field(min_length=1, max_length=64, pattern=NAME_PATTERN)


def _exactly_one(*fields: str) -> dict:
    """JSON schema: exactly one of `fields` is given (and not null)."""
    return {"oneOf": [{"required": [f], "properties": {f: {"not": {"type": "null"}}}} for f in fields]}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _rename(data, renamed: dict[str, str]):
    """`data` with the previous spellings of fields (`renamed`: old -> new) in the new ones."""
    if not isinstance(data, dict) or not any(old in data for old in renamed):
        return data
    data = dict(data)
    for old, new in renamed.items():
        if old in data:
            if new in data:
                raise ValueError(f"give {new!r} or its deprecated spelling {old!r}, not both")
            data[new] = data.pop(old)
    return data


class _Renamed(BaseModel):
    """Accepts the previous spelling of renamed fields (one release; see the module docstring)."""

    renamed: ClassVar[dict[str, str]] = {}  # old name -> new name

    @model_validator(mode="before")
    @classmethod
    def _previous_spellings(cls, data):
        return _rename(data, cls.renamed)

    @classmethod
    def old_spellings(cls, data) -> list[str]:
        """The deprecated field names `data` uses."""
        return [old for old in cls.renamed if isinstance(data, dict) and old in data]


# ---------------------------------------------------------------- modes, adapters, jobs

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


CalibrationParams = CalibrationConfig  # the OpenAPI schema names it CalibrationConfig


class ModeCreate(CalibrationParams, _Renamed):
    renamed = {"kind": "task"}
    name: str = Name
    task: TaskField
    calibration: DataSpec

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        return check_mode_name(v)


class AdapterLoad(_Strict):
    name: str = Name
    directory: str | None = Field(default=None, min_length=1, max_length=64, pattern=NAME_PATTERN,
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
    type: Literal["calibrate"]
    params: ModeCreate


class GenerateParams(GenerationConfig, _Renamed):
    renamed = {"task_kind": "task"}
    task: TaskField
    prompts: DataSpec


class DistillParams(DistillConfig):
    corpus_job: str = Field(max_length=64, pattern=NAME_PATTERN, description="a succeeded generate (or pipeline) job")
    adapter_name: str | None = Field(default=None, min_length=1, max_length=64, pattern=NAME_PATTERN,
                                     description="hot-load the adapter under this name when done")


class EvaluateParams(EvaluationConfig, _Renamed):
    renamed = {"task_kind": "task"}
    task: TaskField
    data: DataSpec
    adapter: str | None = Field(default=None, max_length=64, pattern=NAME_PATTERN, description="a loaded adapter")


class PipelineParams(PipelineConfig, _Renamed):
    renamed = {"task_kind": "task"}
    name: str = Name
    task: TaskField
    calibration: DataSpec
    prompts: DataSpec
    eval_data: DataSpec | None = None
    adapter_name: str | None = Field(default=None, min_length=1, max_length=64, pattern=NAME_PATTERN)


class GenerateJob(_Strict):
    type: Literal["generate"]
    params: GenerateParams


class DistillJob(_Strict):
    type: Literal["distill"]
    params: DistillParams


class EvaluateJob(_Strict):
    type: Literal["evaluate"]
    params: EvaluateParams


class PipelineJob(_Strict):
    type: Literal["pipeline"]
    params: PipelineParams


JobCreate = Union[CalibrateJob, GenerateJob, DistillJob, EvaluateJob, PipelineJob]
JOB_RENAMED = {"kind": "type"}  # a job's type was `kind` before issue 23
JobBody = Annotated[JobCreate, Field(discriminator="type"), BeforeValidator(lambda data: _rename(data, JOB_RENAMED))]
JOB_PARAMS: dict[str, type[BaseModel]] = {get_args(m.model_fields["type"].annotation)[0]: m.model_fields["params"].annotation
                                          for m in get_args(JobCreate)}


def old_job_spellings(body) -> list[str]:
    """The deprecated field names a POST /v1/jobs body uses (`kind`, `params.task_kind`, ...)."""
    if not isinstance(body, dict):
        return []
    old = [name for name in JOB_RENAMED if name in body]
    params = JOB_PARAMS.get(body.get("type", body.get("kind")))
    if params is not None and issubclass(params, _Renamed):
        old += [f"params.{name}" for name in params.old_spellings(body.get("params"))]
    return old


# ---------------------------------------------------------------- job records (what the worker reads)


class Source(BaseModel):
    """A job's data as submission prepared it: a file in the job dir or a shared data set."""

    model_config = ConfigDict(extra="forbid")
    file: str | None = None
    dataset: str | None = None
    limit: int | None = None
    n: int = 0


class Inputs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    calibration: Source | None = None
    prompts: Source | None = None
    data: Source | None = None
    eval_data: Source | None = None


DATA_ROLES = tuple(Inputs.model_fields)


class StoredData(BaseModel):
    """A DataSpec as a job record keeps it: inline rows live in the job dir (`Inputs`), not in the record."""

    model_config = ConfigDict(extra="forbid")
    dataset: str | None = None
    limit: int | None = None


class _Record(BaseModel):
    inputs: Inputs = Field(default_factory=Inputs, alias="_inputs")
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class CalibrateRecord(_Record, ModeCreate):
    calibration: StoredData


class GenerateRecord(_Record, GenerateParams):
    prompts: StoredData


class DistillRecord(_Record, DistillParams):
    pass


class EvaluateRecord(_Record, EvaluateParams):
    data: StoredData


class PipelineRecord(_Record, PipelineParams):
    calibration: StoredData
    prompts: StoredData
    eval_data: StoredData | None = None

    @model_validator(mode="before")
    @classmethod
    def _before_lora_alpha(cls, data):
        """A pipeline stored before `lora_alpha` was a setting trained with alpha = lora_rank."""
        if isinstance(data, dict) and "lora_alpha" not in data:
            data = {**data, "lora_alpha": float(data.get("lora_rank", PipelineConfig.model_fields["lora_rank"].default))}
        return data


RECORDS: dict[str, type[_Record]] = {"calibrate": CalibrateRecord, "generate": GenerateRecord, "distill": DistillRecord,
                                     "evaluate": EvaluateRecord, "pipeline": PipelineRecord}


def job_record(params: BaseModel, inputs: Inputs) -> dict:
    """A validated request's parameters as the job store keeps them (the one serialisation):
    inline data left out (it is in the job dir), the prepared inputs added."""
    inline = {role: {"data", "examples"} for role in DATA_ROLES if role in type(params).model_fields}
    return {**params.model_dump(mode="json", exclude=inline), "_inputs": inputs.model_dump(mode="json", exclude_none=True)}


def load_record(job: dict) -> _Record:
    """A stored job's parameters as its typed record (validated: no restated defaults); a record this
    version cannot read is a clear error, the job's, not the server's."""
    try:
        return RECORDS[job["type"]].model_validate(job["params"])  # a record stored before issue 23: see `renamed`
    except (KeyError, ValidationError) as e:
        why = (f"{'.'.join(map(str, e.errors()[0]['loc']))}: {e.errors()[0]['msg']}" if isinstance(e, ValidationError)
               else f"unknown job type {job['type']!r}")
        raise ValueError(f"job {job['id']}: its stored parameters do not load in this version ({why}); "
                         "submit it again") from None
