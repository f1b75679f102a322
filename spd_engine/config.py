"""One typed config per concept: calibration, generation, evaluation, distillation, pipeline.

Each setting has its default, bounds and help here, once. Everything else is derived from these
models: the `spd` CLI flags (`add_flags` / `from_args`, like vLLM's EngineArgs), the HTTP request
models of the server (`server/schemas.py` subclasses them), the job records and worker task files
(a model's JSON, validated back into the model), and the experiment TOML sections
(`spd_engine/experiment.py`). `tests/test_config_defaults.py` checks that every entry point gives
each shared field the same default.
"""
from __future__ import annotations

import argparse
import types
import typing
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from .paths import NAME_PATTERN
from .tasks import Task

__all__ = ["Config", "ConfigError", "CalibrationShape", "CalibrationConfig", "GenerationConfig", "EvaluationConfig",
           "LoraTraining", "DistillConfig", "BackendConfig", "BatchSize", "PipelineConfig", "Method", "Granularity",
           "KVKind", "Task", "TaskField", "TASK_HELP", "ModeName", "add_flags", "defaults", "from_args", "narrow"]

Method = Literal["gradient", "random", "activation-pca"]
Granularity = Literal["layer", "head"]
KVKind = Literal["k", "v"]
ModeName = Annotated[str, Field(min_length=1, max_length=64, pattern=NAME_PATTERN)]

C = TypeVar("C", bound=BaseModel)

# the task of a data set (`spd_engine.tasks`): the CLI's `--task`, the `task` field of the HTTP requests
TASK_HELP = "the task: which answer tokens decide correctness and how a completion is scored"
TaskField = Annotated[Task, Field(description=TASK_HELP + " (math, mcq, code or custom)")]


class Config(BaseModel):
    """A settings object: unknown keys are refused (a typo is an error, not a silent default)."""

    model_config = ConfigDict(extra="forbid")

    def check(self) -> None:
        """Rules between fields that a JSON schema cannot state (ConfigError naming the field)."""


class ConfigError(ValueError):
    """A setting that does not fit the model it is used with; `field` names the setting."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# ---------------------------------------------------------------- settings shared by several concepts
# (defaults are values, not factories, so the JSON schema states them; pydantic copies a mutable one)

Capability = Annotated[list[ModeName], Field(
    default=[], max_length=8,
    description="capability mode name(s), comma-separated on the command line; several compose (the projection "
                "onto the span of their union); none: the plain model")]
Strength = Annotated[float, Field(
    default=1.0, ge=0.0, le=1.0,
    description="projection strength alpha: 1 is the paper's hard projection, 0 the unmodified model")]
MaxTokens = Annotated[int, Field(
    default=256, ge=1, le=4096,
    description="most tokens generated per prompt (generation stops earlier at the task's stop strings)")]
BatchSize = Annotated[int, Field(default=8, ge=1, le=1024, description="prompts the backend runs at once")]


class BackendConfig(Config):
    """How the library's backend runs the model (`spd_engine.hf_backend.HFBackend`): the CLI's
    generate and eval flags, and an experiment's top-level `batch_size`."""

    batch_size: BatchSize


# ---------------------------------------------------------------- calibration


def default_layers(n_layers: int) -> list[int]:
    """The paper's layers: the middle one and the last one."""
    return sorted({n_layers // 2, n_layers - 1})


class CalibrationShape(Config):
    """Where the subspaces sit and how big they are: shared by every mode of an experiment."""

    layers: list[int] | None = Field(default=None, min_length=1,
                                     description="layer indices (default: the middle and the last layer)")
    kinds: tuple[KVKind, ...] = Field(default=("k", "v"), min_length=1, description="K, V or both: k, v or k,v")
    granularity: Granularity = Field(default="layer", description="one subspace per layer (all KV heads "
                                     "concatenated, the paper's) or one per KV head (for tensor parallelism)")
    rank: int | None = Field(default=None, ge=1, description="fixed rank per group (default: the energy rule if "
                             "given, else d/2, the paper's)")
    batch_size: int = Field(default=4, ge=1, description="calibration examples per forward and backward pass")


class CalibrationConfig(CalibrationShape):
    """Calibration: a labelled set -> a capability subspace pack (`spd_engine.calibrate`)."""

    method: Method = Field(default="gradient", description="gradient (SPD) or an ablation: random, "
                           "activation-pca (centred PCA of the K/V activations)")
    energy: float | None = Field(default=None, gt=0.0, le=1.0,
                                 description="smallest rank holding this fraction of the spectrum's energy")
    seed: int = Field(default=0, description="draws a random subspace")

    def rank_rule(self) -> str:
        if self.rank is not None:
            return f"fixed:{self.rank}"
        return f"energy:{self.energy}" if self.energy is not None else "d/2"

    def check(self) -> None:
        # not a model validator: a schema-valid HTTP request that breaks these gets a 422 naming the field
        if self.rank is not None and self.energy is not None:
            raise ConfigError("energy", "give rank or energy, not both")
        if self.method == "random" and self.energy is not None:
            raise ConfigError("energy", "a random subspace has no spectrum: give it a fixed rank, not an energy fraction")

    def check_model(self, info) -> list[int]:
        """The settings against each other and the model they calibrate (a `ModelInfo`): its layers,
        or ConfigError naming the field."""
        self.check()
        layers = self.layers if self.layers is not None else default_layers(info.n_layers)
        bad = [layer for layer in layers if not 0 <= layer < info.n_layers]
        if bad:
            raise ConfigError("layers", f"layers {bad} do not exist: the model has layers 0..{info.n_layers - 1}")
        width = info.kv_width // (info.n_kv_heads if self.granularity == "head" else 1)
        if self.rank is not None and not 1 <= self.rank <= width:
            raise ConfigError("rank", f"rank {self.rank} is outside 1..{width} (the width of one {self.granularity} group)")
        return layers


# ---------------------------------------------------------------- generation and evaluation


class GenerationConfig(Config):
    """Corpus generation under a mode (`spd_engine.corpus.generate_corpus`)."""

    capability: Capability
    strength: Strength
    max_tokens: MaxTokens
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="sampling temperature (0: greedy)")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1, description="sampling seed (none: unseeded)")


class EvaluationConfig(Config):
    """Scoring under a mode: greedy, stopped at the task's stop strings (`spd_engine.evaluate`)."""

    capability: Capability
    strength: Strength
    max_tokens: MaxTokens


# ---------------------------------------------------------------- distillation


class LoraTraining(Config):
    """The LoRA and optimiser settings (the paper's unless overridden): an experiment's `[distill]`."""

    lora_rank: int = Field(default=8, ge=1, le=256, description="LoRA rank r")
    lora_alpha: float = Field(default=8.0, gt=0.0, description="LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="LoRA dropout")
    lr: float = Field(default=1e-5, gt=0.0, description="AdamW learning rate (cosine schedule, no warm-up)")
    weight_decay: float = Field(default=0.01, ge=0.0, description="AdamW weight decay")
    epochs: int = Field(default=5, ge=1, le=100, description="passes over the corpus")
    steps: int | None = Field(default=None, ge=1, description="a fixed number of optimiser steps instead of "
                              "epochs (the corpus cycled, reshuffled each pass): one budget for corpora of any size")
    batch_size: int = Field(default=4, ge=1, le=256, description="sequences per optimiser step")
    max_length: int = Field(default=1024, ge=2, description="tokens per training sequence (prompt + completion), "
                            "longer ones truncated")


class DistillConfig(LoraTraining):
    """Distillation: LoRA fine-tune of the unprojected model on a corpus (`spd_engine.distill`)."""

    target_modules: tuple[str, ...] = Field(default=("q_proj", "k_proj", "v_proj", "o_proj"), min_length=1,
                                            description="modules that get LoRA weights")
    seed: int = Field(default=42, description="training seed (shuffling and LoRA initialisation)")

    def check(self) -> None:
        """Validate again (a model's attributes can be assigned after it was built)."""
        type(self).model_validate(self.model_dump())


# ---------------------------------------------------------------- pipeline


class PipelineConfig(DistillConfig):
    """calibrate -> generate under the new mode -> distil -> evaluate: the settings of each step (the
    distillation ones flat, as in a distill job)."""

    calibration_params: CalibrationConfig = Field(default=CalibrationConfig(),
                                                  description="calibration settings of the new mode")
    strength: Strength
    max_tokens: MaxTokens
    controls: list[Literal["self-distill"]] = Field(
        default=[], max_length=1,
        description="control arms run beside spd: 'self-distill' is the same pipeline without the projection "
                    "(generation unprojected, the same distillation settings and seed), loaded as ADAPTER-self-distill")

    def generation(self, capability: list[str]) -> GenerationConfig:
        return GenerationConfig(capability=capability, strength=self.strength, max_tokens=self.max_tokens)

    def evaluation(self) -> EvaluationConfig:
        return EvaluationConfig(max_tokens=self.max_tokens)


def narrow(obj: BaseModel, cls: type[C]) -> C:
    """The `cls` settings held by `obj` (an instance of a subclass, e.g. a request model), validated."""
    return cls.model_validate(obj.model_dump(include=set(cls.model_fields)))


# ---------------------------------------------------------------- command-line flags from a config


def _strip_optional(ann):
    if get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def _scalar(ann) -> tuple[type, tuple | None]:
    """(the Python type a string is converted to, its choices) of a scalar annotation."""
    ann = _strip_optional(ann)
    if get_origin(ann) is Annotated:
        ann = get_args(ann)[0]
    if get_origin(ann) is Literal:
        return type(get_args(ann)[0]), get_args(ann)
    return ann, None


def _bounds(f: FieldInfo) -> str:
    lo = hi = None
    for m in f.metadata:
        if isinstance(m, at.Ge):
            lo = f"[{m.ge:g}"
        elif isinstance(m, at.Gt):
            lo = f"({m.gt:g}"
        elif isinstance(m, at.Le):
            hi = f"{m.le:g}]"
        elif isinstance(m, at.Lt):
            hi = f"{m.lt:g})"
    if lo and hi:
        return f"must be in {lo}, {hi}"
    if lo:
        return f"must be {'>=' if lo[0] == '[' else '>'} {lo[1:]}"
    if hi:
        return f"must be {'<=' if hi[-1] == ']' else '<'} {hi[:-1]}"
    return "is invalid"


def _flag_type(flag: str, f: FieldInfo):
    """argparse `type=` for a field: the string converted, then validated by the field itself, so a
    flag's bounds are the config's (`--strength must be in [0.0, 1.0], got 1.5`)."""
    ann = _strip_optional(f.annotation)
    is_list = get_origin(ann) in (list, tuple)
    elem, _ = _scalar(get_args(ann)[0]) if is_list else _scalar(ann)
    check = TypeAdapter(Annotated[f.annotation, f])

    def convert(raw: str):
        try:
            value = [elem(v) for v in (s.strip() for s in raw.split(",")) if v] if is_list else elem(raw)
        except ValueError:
            what = f"comma-separated {elem.__name__} values" if is_list else f"a {elem.__name__}"
            raise argparse.ArgumentTypeError(f"{flag} must be {what}, got {raw!r}") from None
        try:
            check.validate_python(value)
        except ValidationError as e:
            err = e.errors()[0]
            why = _bounds(f) if err["type"] in ("greater_than_equal", "greater_than", "less_than_equal", "less_than") \
                else err["msg"].lower()
            raise argparse.ArgumentTypeError(f"{flag} {why}, got {raw}") from None
        return value

    convert.__name__ = flag  # argparse names the type in its own messages
    return convert


def add_flags(parser: argparse.ArgumentParser, cls: type[Config], skip: tuple[str, ...] = ()) -> None:
    """One `--field-name` flag per field of `cls`, with the field's default, bounds, choices and help."""
    for name, f in cls.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        default = defaults(cls)[name]
        ann = _strip_optional(f.annotation)
        _, choices = (None, None) if get_origin(ann) in (list, tuple) else _scalar(ann)
        text = f.description or ""
        if default not in (None, []):
            text += f" (default: {','.join(map(str, default)) if isinstance(default, list) else default})"
        if choices:
            parser.add_argument(flag, dest=name, default=default, choices=choices, help=text)
        else:
            parser.add_argument(flag, dest=name, default=default, type=_flag_type(flag, f), help=text)


def from_args(cls: type[C], args: argparse.Namespace) -> C:
    """The config the parsed flags give; a combination the config refuses is a ValueError naming the flag."""
    try:
        cfg = cls.model_validate({k: getattr(args, k) for k in cls.model_fields if hasattr(args, k)})
        cfg.check()
    except ValidationError as e:
        err = e.errors()[0]
        where = "--" + str(err["loc"][0]).replace("_", "-") + ": " if err["loc"] else ""
        raise ValueError(where + err["msg"].removeprefix("Value error, ")) from None
    except ConfigError as e:
        raise ValueError(f"--{e.field.replace('_', '-')}: {e}") from None
    return cfg


def defaults(cls: type[Config]) -> dict[str, Any]:
    """Every field's default as JSON carries it (a tuple as a list)."""
    out = {}
    for name, f in cls.model_fields.items():
        value = f.get_default(call_default_factory=True)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out
