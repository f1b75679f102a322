"""`spd experiment CONFIG`: does SPD beat the base model and raw self-distillation?

For each domain, real data is split (seeded, disjoint, ids recorded) into calibration, generation
prompts and evaluation. Conditions, same seeds and decoding everywhere:
  base          no training
  hooks-only    the base model served with the domain's SPD mode (no training)
  self-distill  generate without projection, distil
  spd           generate with the gradient subspace, distil
  spd-random    generate with a random subspace of the same rank, distil
  spd-pca       generate with an activation-PCA subspace of the same rank, distil
Every condition is evaluated on every domain's evaluation set (in- and out-of-domain).

Each stage's output is cached under `<out>/cache/<stage>-<hash of its inputs>`, so a rerun after an
interruption continues where it stopped (corpus generation resumes mid-file).
"""
from __future__ import annotations

import hashlib
import json
import random
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from tqdm import tqdm

from . import models
from .atomic import write_json
from .calibrate import CalibrationConfig, calibrate
from .corpus import generate_corpus, read_corpus
from .data import data_sha256, load_examples, resolve_data
from .distill import DistillConfig, distill
from .evaluate import accuracy, score_completions, span_nll_eval
from .hf_backend import HFBackend
from .paths import check_name
from .subspace import Store
from .tasks import SHORT_ANSWER_KINDS, Example, Kind

CONDITIONS = ("base", "hooks-only", "self-distill", "spd", "spd-random", "spd-pca")
_MODE_OF = {"hooks-only": "gradient", "spd": "gradient", "spd-random": "random", "spd-pca": "activation-pca"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DomainConfig(_Strict):
    name: str
    kind: Literal["math", "mcq", "code", "custom"]
    data: list[str]
    calibration: int = Field(gt=0)
    generation: int = Field(gt=0)
    evaluation: int = Field(gt=0)
    max_tokens: int = Field(default=192, gt=0)  # generation and free-generation evaluation
    metrics: list[Literal["accuracy", "span-nll"]] | None = None  # this domain's evaluation set; None: the experiment's

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "domain name")


class CalibrationSection(_Strict):
    layers: list[int] | None = None
    kinds: list[Literal["k", "v"]] = ["k", "v"]
    rank: int = Field(default=16, gt=0)
    granularity: Literal["layer", "head"] = "layer"
    batch_size: int = Field(default=4, gt=0)


class DistillSection(_Strict):
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.05
    lr: float = 1e-5
    weight_decay: float = 0.01
    epochs: int = 5
    batch_size: int = 4
    max_length: int = 1024


class ExperimentConfig(_Strict):
    name: str
    model: str = models.DEFAULT_MODEL
    seed: int = 42
    estimated_minutes: int | None = None  # what the config was sized for, on a 2-core CPU
    strength: float = Field(default=1.0, ge=0, le=1)
    batch_size: int = Field(default=8, gt=0)
    metrics: list[Literal["accuracy", "span-nll"]] = ["accuracy", "span-nll"]
    conditions: list[Literal["base", "hooks-only", "self-distill", "spd", "spd-random", "spd-pca"]] = list(CONDITIONS)
    domains: list[DomainConfig]
    calibration: CalibrationSection = CalibrationSection()
    distill: DistillSection = DistillSection()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "experiment name")


def load_config(path: Path) -> ExperimentConfig:
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{path}: cannot read the experiment config: {e}") from None
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise ValueError(f"{path}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    if len({d.name for d in cfg.domains}) != len(cfg.domains):
        raise ValueError(f"{path}: domain names must be unique")
    return cfg


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _content(examples: list[Example]) -> str:
    """A stage's examples as they reach the model: a loader change invalidates the cache too."""
    return _hash([[ex.id, ex.prompt, ex.answer, ex.span, ex.options] for ex in examples])


class _Stages:
    """Runs each stage once per input hash; results (and wall time) land in `cache/<stage>-<hash>`. A stage's
    files are found through its directory (`dir`), never through a path stored in its result, so the
    results folder can move."""

    def __init__(self, root: Path):
        self.root = root / "cache"
        self.timings: list[dict] = []

    def dir(self, stage: str, key: dict) -> Path:
        return self.root / f"{stage}-{_hash(key)}"

    def run(self, stage: str, key: dict, fn: Callable[[Path], dict]) -> dict:
        where = self.dir(stage, key)
        done = where / "done.json"
        if done.exists():
            result = json.loads(done.read_text())
            self.timings.append({"stage": stage, "seconds": result["seconds"], "cached": True})
            return result
        where.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        result = {**fn(where), "seconds": round(time.perf_counter() - started, 2), "key": key}
        write_json(done, result)
        self.timings.append({"stage": stage, "seconds": result["seconds"], "cached": False})
        return result


def split(domain: DomainConfig, seed: int) -> dict[str, list[Example]]:
    """Disjoint calibration / generation / evaluation sets, shuffled with the experiment's seed."""
    items = [ex for src in domain.data for ex in load_examples(resolve_data(src), domain.kind)]
    need = domain.calibration + domain.generation + domain.evaluation
    if len(items) < need:
        raise ValueError(f"domain {domain.name!r} has {len(items)} items, its splits need {need}")
    random.Random(f"{seed}:{domain.name}").shuffle(items)
    a, b = domain.calibration, domain.calibration + domain.generation
    return {"calibration": items[:a], "generation": items[a:b], "evaluation": items[b:need]}


def _corpus_quality(kind: Kind, prompts: list[Example], path: Path) -> dict:
    """The generated corpus scored against the prompts' gold answers, and (math, mcq) its most common
    answer's share: a model that answers one letter whatever the question shows it here."""
    rows = {r["id"]: r["completion"] for r in read_corpus(path)}
    r = score_completions(kind, prompts, [rows[ex.id] for ex in prompts])
    if kind not in SHORT_ANSWER_KINDS:
        return {**r.summary(), "top_answer": None, "top_answer_share": None}
    top, count = Counter(it["answer"] for it in r.items).most_common(1)[0]
    return {**r.summary(), "top_answer": top, "top_answer_share": count / r.n}


def run_experiment(config_path: Path, out_root: Path) -> Path:
    cfg = load_config(config_path)
    root = Path(out_root) / cfg.name
    root.mkdir(parents=True, exist_ok=True)
    stages = _Stages(root)
    store = Store(root / "subspaces")
    backend = HFBackend(cfg.model, batch_size=cfg.batch_size)
    ident = backend.model_info.identity
    splits = {d.name: split(d, cfg.seed) for d in cfg.domains}
    sources = {d.name: {s: data_sha256(resolve_data(s)) for s in d.data} for d in cfg.domains}
    write_json(root / "splits.json", {d: {k: [ex.id for ex in v] for k, v in s.items()} for d, s in splits.items()})

    # ---- calibration: the modes each domain's conditions need
    modes: dict[tuple[str, str], str] = {}
    for d in cfg.domains:
        for method in sorted({_MODE_OF[c] for c in cfg.conditions if c in _MODE_OF}):
            name = f"{d.name}-{method}"
            key = {"model": ident, "data": sources[d.name], "examples": _content(splits[d.name]["calibration"]),
                   "kind": d.kind, "method": method, "cfg": cfg.calibration.model_dump(), "seed": cfg.seed}

            def do_calibrate(where: Path, d=d, method=method, name=name) -> dict:
                c = cfg.calibration
                pack = calibrate(backend.model, backend.tokenizer, backend.model_info, d.kind,
                                 splits[d.name]["calibration"], name,
                                 CalibrationConfig(layers=c.layers, kinds=tuple(c.kinds), granularity=c.granularity,
                                                   method=method, rank=c.rank, batch_size=c.batch_size, seed=cfg.seed))
                Store(where).save(pack, overwrite=True)
                return {"pack": name}

            stages.run("calibrate", key, do_calibrate)
            pack = Store(stages.dir("calibrate", key)).load(name, backend.model_info)
            if name in store.names():
                store.delete(name)
            store.save(pack)
            backend.add_subspace(pack)
            modes[(d.name, method)] = name

    # ---- generation + distillation for the trained conditions
    adapters: dict[tuple[str, str], str] = {}
    corpora: list[dict] = []  # how good each condition's self-generated training data is
    for d in cfg.domains:
        for cond in [c for c in cfg.conditions if c not in ("base", "hooks-only")]:
            capability = (modes[(d.name, _MODE_OF[cond])],) if cond in _MODE_OF else ()
            gen_key = {"model": ident, "data": sources[d.name], "examples": _content(splits[d.name]["generation"]),
                       "kind": d.kind, "capability": capability, "strength": cfg.strength, "max_tokens": d.max_tokens,
                       "calibration": cfg.calibration.model_dump(), "seed": cfg.seed}

            def do_generate(where: Path, d=d, capability=capability, cond=cond) -> dict:
                prompts = splits[d.name]["generation"]
                with tqdm(total=len(prompts), desc=f"{d.name}/{cond}: generate", unit="ex", file=sys.stderr) as bar:
                    return generate_corpus(backend, d.kind, prompts, where / "corpus.jsonl", capability=capability,
                                           strength=cfg.strength, max_tokens=d.max_tokens, seed=cfg.seed,
                                           chunk=cfg.batch_size, progress=bar.update)

            stages.run("generate", gen_key, do_generate)
            corpus = stages.dir("generate", gen_key) / "corpus.jsonl"
            corpora.append({"domain": d.name, "condition": cond,
                            **_corpus_quality(d.kind, splits[d.name]["generation"], corpus)})

            def do_distill(where: Path, corpus=corpus, cond=cond, d=d) -> dict:
                rows = read_corpus(corpus)
                model, tok = models.load(backend.model_info.path)
                dc = DistillConfig(**cfg.distill.model_dump(), seed=cfg.seed)
                bar = tqdm(desc=f"{d.name}/{cond}: distill", unit="step", file=sys.stderr)
                report = distill(model, tok, rows, where / "adapter", dc,
                                 lambda step, total, loss: (setattr(bar, "total", total), bar.update(1)))
                bar.close()
                return {"adapter": "adapter", "train": report}

            distill_key = {"corpus": gen_key, "distill": cfg.distill.model_dump(), "seed": cfg.seed}
            stages.run("distill", distill_key, do_distill)
            name = f"{d.name}-{cond}"
            if name not in backend.adapters():
                backend.load_adapter(name, str(stages.dir("distill", distill_key) / "adapter"))
            adapters[(d.name, cond)] = name

    # ---- evaluation: every condition on every domain's evaluation set
    results: list[dict] = []
    for d in cfg.domains:
        for cond in cfg.conditions:
            if cond == "base" and d is not cfg.domains[0]:
                continue  # base does not depend on the training domain
            capability = (modes[(d.name, "gradient")],) if cond == "hooks-only" else ()
            adapter = adapters.get((d.name, cond))
            for e in cfg.domains:
                for metric in e.metrics or cfg.metrics:
                    key = {"model": ident, "train_domain": d.name if cond != "base" else None, "condition": cond,
                           "eval": e.name, "examples": _content(splits[e.name]["evaluation"]), "metric": metric,
                           "max_tokens": e.max_tokens, "calibration": cfg.calibration.model_dump(),
                           "distill": cfg.distill.model_dump(), "strength": cfg.strength, "seed": cfg.seed,
                           "data": sources[e.name]}

                    def do_eval(where: Path, e=e, metric=metric, capability=capability, adapter=adapter) -> dict:
                        items = splits[e.name]["evaluation"]
                        if metric == "accuracy":
                            r = accuracy(backend, e.kind, items, capability=capability, strength=cfg.strength,
                                         adapter=adapter, max_tokens=e.max_tokens)
                        else:
                            r = span_nll_eval(backend, e.kind, items, capability=capability, strength=cfg.strength,
                                              adapter=adapter)
                        return {"summary": r.summary(), "items": r.items}

                    res = stages.run("evaluate", key, do_eval)
                    results.append({"condition": cond, "train_domain": d.name if cond != "base" else None,
                                    "eval": e.name, "in_domain": cond == "base" or d.name == e.name,
                                    "metric": metric, **res["summary"], "items": res["items"]})
    backend.close()

    from .experiment_report import write_report

    write_report(root, cfg, config_path, results, corpora, store, stages.timings)
    return root

