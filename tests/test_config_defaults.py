"""One typed config per concept (`spd_engine.config`): the CLI's flags, the server's OpenAPI schema
and the experiment loader all derive their settings from it, so every entry point gives a shared
setting the same default; and a job's parameters are that config from request to worker."""
from __future__ import annotations

import argparse

import pytest

from spd_engine import cli
from spd_engine.config import (BackendConfig, CalibrationConfig, CalibrationShape, DistillConfig, EvaluationConfig,
                               GenerationConfig, LoraTraining, PipelineConfig, defaults, from_args)
from spd_engine.experiment import ExperimentConfig

CONCEPTS = {"calibrate": CalibrationConfig, "generate": GenerationConfig, "distill": DistillConfig,
            "eval": EvaluationConfig}


def _subcommand(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command", CONCEPTS)
def test_cli_flags_have_the_configs_defaults_and_help(command):
    cls, sp = CONCEPTS[command], _subcommand(command)
    help_text = " ".join(sp.format_help().split())
    for name, default in defaults(cls).items():
        assert sp.get_default(name) == default, (command, name)
        assert "--" + name.replace("_", "-") in help_text
    assert from_args(cls, argparse.Namespace(**defaults(cls))) == cls()


def test_cli_flags_are_bounded_by_the_config():
    with pytest.raises(SystemExit):
        _subcommand("distill").parse_args(["--corpus", "c", "--out", "o", "--lora-rank", "0"])
    args = _subcommand("calibrate").parse_args(["--data", "d", "--task", "math", "--name", "n", "--rank", "4",
                                                "--energy", "0.5"])
    with pytest.raises(ValueError, match="rank or energy"):
        from_args(CalibrationConfig, args)


def _openapi() -> dict:
    pytest.importorskip("fastapi")
    from fastapi import FastAPI

    from server.routes_resources import router

    app = FastAPI()
    app.include_router(router)  # the routes and request models the server app mounts
    return app.openapi()["components"]["schemas"]


REQUESTS = {"CalibrationConfig": CalibrationConfig, "ModeCreate": CalibrationConfig,
            "GenerateParams": GenerationConfig, "DistillParams": DistillConfig, "EvaluateParams": EvaluationConfig,
            "PipelineParams": PipelineConfig}


@pytest.mark.parametrize("model", REQUESTS)
def test_the_openapi_schema_states_the_configs_defaults(model):
    props = _openapi()[model]["properties"]
    for name, default in defaults(REQUESTS[model]).items():
        if isinstance(default, CalibrationConfig):
            default = default.model_dump(mode="json", exclude_none=True)  # the schema leaves the nulls out
        assert props[name].get("default") == default, (model, name, props[name])


def test_the_experiment_loader_gives_the_configs_defaults():
    cfg = ExperimentConfig.model_validate({"name": "x", "domains": [
        {"name": "d", "task": "math", "data": ["gsm8k"], "calibration": 1, "generation": 1, "evaluation": 1}]})
    assert cfg.calibration.model_dump(include=set(CalibrationShape.model_fields)) == CalibrationShape().model_dump()
    assert cfg.distill.model_dump() == LoraTraining().model_dump() == DistillConfig().model_dump(
        include=set(LoraTraining.model_fields))
    assert cfg.domains[0].max_tokens == GenerationConfig().max_tokens == EvaluationConfig().max_tokens
    assert cfg.strength == GenerationConfig().strength
    assert cfg.batch_size == BackendConfig().batch_size == _subcommand("generate").get_default("batch_size") \
        == _subcommand("eval").get_default("batch_size")


def test_the_pipeline_uses_the_distillation_settings_it_is_given():
    p = PipelineConfig(lora_rank=16)
    assert (p.lora_alpha, p.batch_size, p.max_length, p.seed) == (8.0, 4, 1024, 42)  # DistillConfig's defaults
    assert PipelineConfig(lora_alpha=32.0, batch_size=2, max_length=256, seed=7).model_dump(
        include={"lora_alpha", "batch_size", "max_length", "seed"}) == {"lora_alpha": 32.0, "batch_size": 2,
                                                                        "max_length": 256, "seed": 7}
    assert p.generation(["m"]).max_tokens == p.evaluation().max_tokens == GenerationConfig().max_tokens


def test_a_job_record_round_trips_into_its_typed_config_and_an_old_one_loads_or_fails_clearly():
    pytest.importorskip("fastapi")
    from server.schemas import Inputs, PipelineParams, Source, job_record, load_record

    params = PipelineParams.model_validate({"name": "m", "task": "math", "calibration": {"data": "{}"},
                                            "prompts": {"dataset": "gsm8k", "limit": 3}, "lora_rank": 16})
    stored = job_record(params, Inputs(calibration=Source(file="inputs/calibration.jsonl", n=1)))
    assert "data" not in stored["calibration"]  # inline rows live in the job dir
    rec = load_record({"id": "j", "type": "pipeline", "params": stored})
    assert rec.lora_rank == 16 and rec.lora_alpha == 8.0 and rec.inputs.calibration.n == 1
    # a pipeline stored before lora_alpha was a setting trained with alpha = rank: it still does
    old = {k: v for k, v in stored.items() if k not in ("lora_alpha", "batch_size", "max_length", "seed")}
    assert load_record({"id": "j", "type": "pipeline", "params": old}).lora_alpha == 16.0
    with pytest.raises(ValueError, match="job j: its stored parameters do not load.*lora_rank"):
        load_record({"id": "j", "type": "pipeline", "params": {**stored, "lora_rank": "many"}})
