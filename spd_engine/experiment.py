"""`spd experiment CONFIG`: does SPD beat the base model and raw self-distillation?

For each domain, real data is split (seeded, disjoint, ids recorded) into calibration, generation
prompts and evaluation. Conditions, same decoding everywhere:
  base          no training
  hooks-only    the base model served with the domain's SPD mode (no training)
  self-distill  generate without projection, distil
  spd           generate with the gradient subspace, distil
  spd-random    generate with a random subspace of the same rank, distil
  spd-pca       generate with an activation-PCA subspace (centred) of the same rank, distil
Every condition is evaluated on every domain's evaluation set (in- and out-of-domain); a trained
condition with its adapter merged into a copy of the weights.

Each trained condition is trained once per training seed (`seeds`; the seed also draws the random
subspace of spd-random), so the report can say how much of a difference survives another seed.
The mode conditions run at `calibration.rank` and, for a rank sweep, at every rank of
`calibration.ranks`. With `rounds = 2`, multi-round SPD: round 2 starts from the round-1 model
(base + the round-1 adapter, merged into a copy of the weights), calibrates on it, generates with it
and its mode, and distils a new adapter on top of it.

Gold answers are put in a fixed answer format first (`tasks.with_answer_format`): teacher-forced
measures score the answer after `Answer: (` (mcq) or `The answer is ` (a bare number), never the
answer's format.

Each stage's output is cached under `<out>/cache/<stage>-<hash of its inputs>`; a stage's key holds
the keys of every stage that made its inputs (an evaluation's key holds its adapter's distil key,
which holds its corpus's generation key, which holds its mode's calibration key), so changing any
setting upstream recomputes everything downstream and nothing else. A rerun after an interruption
continues where it stopped (corpus generation resumes mid-file).
"""
from __future__ import annotations

import hashlib
import json
import random
import sys
import time
import tomllib
import warnings
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from tqdm import tqdm

from . import models
from .atomic import write_json
from .calibrate import CalibrationConfig, calibrate
from .config import BatchSize, CalibrationShape, LoraTraining, MaxTokens, Strength, TaskField, narrow
from .corpus import generate_corpus, read_corpus
from .data import data_sha256, load_examples, resolve_data
from .distill import DistillConfig, distill
from .evaluate import SCORING_VERSION, accuracy, letter_accuracy, score_completions, span_nll_eval
from .hf_backend import HFBackend
from .paths import check_name
from .stats import detectable_difference
from .subspace import Store
from .tasks import SHORT_ANSWER_TASKS, Example, Task, correctness_span, stop_strings, with_answer_format

CONDITIONS = ("base", "hooks-only", "self-distill", "spd", "spd-random", "spd-pca")
TRAINED = ("self-distill", "spd", "spd-random", "spd-pca")
_MODE_OF = {"hooks-only": "gradient", "spd": "gradient", "spd-random": "random", "spd-pca": "activation-pca"}
MODE_CONDITIONS = tuple(_MODE_OF)
Metric = Literal["accuracy", "span-nll", "letter-accuracy"]
# What changed the meaning of a cached calibration (bump with the method): 2 = centred activation PCA.
CALIBRATION_VERSION = 2


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DomainConfig(_Strict):
    name: str
    task: TaskField
    data: list[str]
    train: bool = True  # false: an evaluation set only (out of domain for every trained arm), no arms of its own
    calibration: int = Field(default=0, ge=0)
    generation: int = Field(default=0, ge=0)
    evaluation: int = Field(gt=0)
    max_tokens: MaxTokens  # generation and free-generation evaluation
    metrics: list[Metric] | None = None  # this domain's evaluation set; None: the experiment's

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "domain name")

    @model_validator(mode="before")
    @classmethod
    def _deprecated_kind(cls, v):
        # `kind` was this key's name until the glossary's rename; accepted for one release. A FutureWarning:
        # Python shows it by default (a DeprecationWarning raised from here would be hidden from users)
        if isinstance(v, dict) and "kind" in v:
            if "task" in v:
                raise ValueError("give `task` only (`kind` is its deprecated name)")
            warnings.warn("domain key `kind` is deprecated: write `task`", FutureWarning, stacklevel=2)
            v = {("task" if k == "kind" else k): x for k, x in v.items()}
        return v

    @model_validator(mode="after")
    def _splits(self):
        if self.train and not (self.calibration and self.generation):
            raise ValueError(f"domain {self.name!r} trains: calibration and generation must be > 0")
        if not self.train and (self.calibration or self.generation):
            raise ValueError(f"domain {self.name!r} is an evaluation set only (train = false): "
                             "calibration and generation must be 0")
        return self


class CalibrationSection(CalibrationShape):
    """`[calibration]`: the calibration settings every mode condition shares (its method is the
    condition's), at `rank` (None: d/2), plus a rank sweep."""

    ranks: list[int] | None = None  # rank sweep: the `sweep` conditions also run at each of these
    sweep: list[Literal["hooks-only", "spd", "spd-random", "spd-pca"]] | None = None  # None: every mode condition

    @field_validator("ranks")
    @classmethod
    def _ranks(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(r <= 0 for r in v) or len(set(v)) != len(v)):
            raise ValueError("ranks must be distinct positive integers")
        return v


class DistillSection(LoraTraining):
    """`[distill]`: the LoRA and optimiser settings of every trained condition (its seed is the arm's)."""


class ExperimentConfig(_Strict):
    name: str
    model: str = models.DEFAULT_MODEL
    seed: int = 42  # splits and generation
    seeds: list[int] | None = None  # training seeds (each trained condition once per seed); None: [seed]
    estimated_minutes: int | None = None  # what the config was sized for, on a 2-core CPU
    strength: Strength
    batch_size: BatchSize
    metrics: list[Metric] = ["accuracy", "span-nll"]
    conditions: list[Literal["base", "hooks-only", "self-distill", "spd", "spd-random", "spd-pca"]] = list(CONDITIONS)
    out_of_domain: bool = True  # evaluate every condition on the other domains' evaluation sets too
    rounds: int = Field(default=1, ge=1, le=4)  # multi-round SPD: rounds 2.. continue from the previous round's model
    round_conditions: list[Literal["self-distill", "spd", "spd-random", "spd-pca"]] = ["self-distill", "spd"]
    domains: list[DomainConfig]
    calibration: CalibrationSection = CalibrationSection()
    distill: DistillSection = DistillSection()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "experiment name")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("seeds must be a non-empty list of distinct integers")
        return v

    @model_validator(mode="after")
    def _rounds(self):
        if self.rounds > 1 and not set(self.round_conditions) <= set(self.conditions):
            raise ValueError("round_conditions must be among the conditions")
        return self

    @property
    def training_seeds(self) -> list[int]:
        return self.seeds or [self.seed]


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


class NotCached(Exception):
    """A stage a cached-only run would have had to compute."""


class _Stages:
    """Runs each stage once per input hash; results (and wall time) land in `cache/<stage>-<hash>`. A stage's
    files are found through its directory (`dir`), never through a path stored in its result, so the
    results folder can move."""

    def __init__(self, root: Path, cached_only: bool = False):
        self.root = root / "cache"
        self.cached_only = cached_only  # read what is cached, compute nothing (NotCached for the rest)
        self.timings: list[dict] = []
        self._done: dict[str, dict] = {}  # stages already run or read in this run (arms share stages)

    def dir(self, stage: str, key: dict) -> Path:
        return self.root / f"{stage}-{_hash(key)}"

    def cached(self, stage: str, key: dict) -> bool:
        return (self.dir(stage, key) / "done.json").exists()

    def run(self, stage: str, key: dict, fn: Callable[[Path], dict], needs: str | None = None) -> dict:
        """`needs`: a file the caller reads from the stage's directory; a cached stage without it (a
        committed cache keeps no adapters) runs again."""
        where = self.dir(stage, key)
        have = needs is None or (where / needs).exists()
        if where.name in self._done and have:
            return self._done[where.name]
        done = where / "done.json"
        if done.exists() and have:
            result = json.loads(done.read_text())
            self.timings.append({"stage": stage, "seconds": result["seconds"], "cached": True})
        elif self.cached_only:
            raise NotCached(where.name)
        else:
            first = json.loads(done.read_text()) if done.exists() else None
            where.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            result = {**fn(where), "seconds": round(time.perf_counter() - started, 2), "key": key}
            if first is not None:  # `needs` made again: the first record stays, each rebuild is added to it
                result = {**first, "rebuilt": first.get("rebuilt", []) + [{k: v for k, v in result.items() if k != "key"}]}
            write_json(done, result)
            self.timings.append({"stage": stage, "seconds": result["seconds"], "cached": False})
        self._done[where.name] = result
        return result


def split(domain: DomainConfig, seed: int) -> dict[str, list[Example]]:
    """Disjoint calibration / generation / evaluation sets, shuffled with the experiment's seed; gold
    answers in the fixed answer format of `tasks.with_answer_format`."""
    items = [with_answer_format(domain.task, ex)
             for src in domain.data for ex in load_examples(resolve_data(src), domain.task)]
    need = domain.calibration + domain.generation + domain.evaluation
    if len(items) < need:
        raise ValueError(f"domain {domain.name!r} has {len(items)} items, its splits need {need}")
    random.Random(f"{seed}:{domain.name}").shuffle(items)
    a, b = domain.calibration, domain.calibration + domain.generation
    return {"calibration": items[:a], "generation": items[a:b], "evaluation": items[b:need]}


def eval_set_baselines(task: Task, examples: list[Example]) -> dict:
    """What an evaluation set gives away without skill: for multiple choice, the gold letters' counts,
    the accuracy of always answering the most common gold letter, and chance (mean 1 / options)."""
    out: dict = {"task": task, "n": len(examples),
                 "detectable_difference": detectable_difference(len(examples)) if examples else None}
    if task == "mcq" and examples:
        golds = Counter(ex.answer[slice(*correctness_span(task, ex))] for ex in examples)  # type: ignore[index]
        top, count = golds.most_common(1)[0]
        out.update(gold_letters=dict(sorted(golds.items())), constant_letter=top, constant_accuracy=count / len(examples),
                   chance=sum(1 / len(ex.options) for ex in examples) / len(examples))
    return out


def _corpus_quality(task: Task, prompts: list[Example], path: Path) -> dict:
    """The generated corpus scored against the prompts' gold answers, and (math, mcq) its most common
    answer's share: a model that answers one letter whatever the question shows it here."""
    rows = {r["id"]: r for r in read_corpus(path)}
    r = score_completions(task, prompts, [rows[ex.id]["completion"] for ex in prompts])
    tokens = sum(rows[ex.id].get("n_tokens", 0) for ex in prompts)
    if task not in SHORT_ANSWER_TASKS:
        return {**r.summary(), "top_answer": None, "top_answer_share": None, "completion_tokens": tokens}
    top, count = Counter(it["answer"] for it in r.items).most_common(1)[0]
    return {**r.summary(), "top_answer": top, "top_answer_share": count / r.n, "completion_tokens": tokens}


@dataclass(frozen=True)
class Arm:
    """One trained or served model: a condition trained on a domain, at a rank (mode conditions), with a
    training seed (trained conditions), in a round (round k > 1 continues from round k - 1)."""

    condition: str
    domain: str | None = None
    rank: int | None = None
    seed: int | None = None
    round: int = 1

    @property
    def label(self) -> str:
        """The arm without its seed: what the report aggregates over seeds."""
        out = self.condition + (f" r{self.rank}" if self.rank is not None else "")
        return out + (f" round {self.round}" if self.round > 1 else "")

    @property
    def name(self) -> str:
        """An adapter / mode name for this arm (with its seed)."""
        out = f"{self.domain}-{self.condition}" + (f"-r{self.rank}" if self.rank is not None else "")
        return out + (f"-s{self.seed}" if self.seed is not None else "") + (f"-round{self.round}" if self.round > 1 else "")

    def parent(self) -> "Arm":
        return replace(self, round=self.round - 1)


def arms(cfg: ExperimentConfig) -> list[Arm]:
    """Every model the experiment evaluates, in the order it builds them."""
    c = cfg.calibration
    sweep = set(c.sweep if c.sweep is not None else MODE_CONDITIONS)
    out: list[Arm] = [Arm("base")] if "base" in cfg.conditions else []
    for d in (d for d in cfg.domains if d.train):
        for cond in cfg.conditions:
            if cond == "base":
                continue
            ranks = [None]
            if cond in _MODE_OF:
                ranks = list(dict.fromkeys([c.rank] + (c.ranks or [] if cond in sweep else [])))
            seeds = cfg.training_seeds if cond in TRAINED else [None]
            out += [Arm(cond, d.name, r, s) for r in ranks for s in seeds]
        for k in range(2, cfg.rounds + 1):
            out += [Arm(cond, d.name, c.rank if cond in _MODE_OF else None, s, k)
                    for cond in cfg.round_conditions for s in cfg.training_seeds]
    return out


def _merged_backend(cfg: ExperimentConfig, adapters: list[Path], key: dict) -> HFBackend:
    """A backend whose model is the base model with `adapters` (earlier rounds, in order) merged into a
    copy of its weights; its identity names that lineage, so packs calibrated on it fit only it."""
    from peft import PeftModel

    b = HFBackend(cfg.model, batch_size=cfg.batch_size)
    for a in adapters:
        b.model = PeftModel.from_pretrained(b.model, str(a)).merge_and_unload().eval()
    b.model_info = replace(b.model_info, identity=hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest())
    return b


def _merged_model(path: Path, adapters: list[Path]):
    from peft import PeftModel

    model, tok = models.load(path)
    for a in adapters:
        model = PeftModel.from_pretrained(model, str(a)).merge_and_unload()
    return model, tok


def evaluation_plan(cfg: ExperimentConfig, arm: Arm) -> list[tuple[DomainConfig, Metric]]:
    """The (eval set, metric) pairs an arm is evaluated on."""
    return [(e, metric) for e in cfg.domains if cfg.out_of_domain or arm.domain is None or e.name == arm.domain
            for metric in e.metrics or cfg.metrics if metric != "letter-accuracy" or e.task == "mcq"]


def run_experiment(config_path: Path, out_root: Path, cached_only: bool = False) -> Path:
    """Run every stage not yet cached, then write the report. `cached_only`: compute nothing, load no
    model, and report what the cache holds so far (a run still under way; the report says how much is
    missing)."""
    cfg = load_config(config_path)
    root = Path(out_root) / cfg.name
    root.mkdir(parents=True, exist_ok=True)
    stages = _Stages(root, cached_only)
    store = Store(root / "subspaces")
    base_backend = None if cached_only else HFBackend(cfg.model, batch_size=cfg.batch_size)
    # the model's identity keys every stage; a cached-only run reads it without loading the weights
    ident = (base_backend.model_info if base_backend else models.info(models.resolve(cfg.model))).identity
    splits = {d.name: split(d, cfg.seed) for d in cfg.domains}
    domains = {d.name: d for d in cfg.domains}
    sources = {d.name: {s: data_sha256(resolve_data(s)) for s in d.data} for d in cfg.domains}
    write_json(root / "splits.json", {d: {k: [ex.id for ex in v] for k, v in s.items()} for d, s in splits.items()})
    c = cfg.calibration

    # ---- per arm: the model it starts from, its mode (calibration), corpus, adapter; keys chain stage to stage
    model_key: dict[Arm, object] = {}  # what the arm's starting model is: the base, or base + earlier adapters
    calib_key: dict[Arm, dict | None] = {}
    distill_key: dict[Arm, dict | None] = {}
    adapter_dir: dict[Arm, Path] = {}
    lineage: dict[Arm, list[Path]] = {}  # adapters merged into the arm's starting model
    corpora: list[dict] = []
    training: list[dict] = []
    results: list[dict] = []
    seen_corpora: set[str] = set()

    def calibrate_mode(backend: HFBackend | None, arm: Arm) -> str:
        d = domains[arm.domain]  # type: ignore[index]
        method = _MODE_OF[arm.condition]
        seed = arm.seed if method == "random" else None  # a random subspace is drawn per training seed
        # the cache keys spell the task "kind", as before the rename, so existing caches stay valid
        key = {"model": model_key[arm], "data": sources[d.name], "examples": _content(splits[d.name]["calibration"]),
               "kind": d.task, "method": method, "layers": c.layers, "kinds": c.kinds, "granularity": c.granularity,
               "batch_size": c.batch_size, "rank": arm.rank, "seed": seed, "version": CALIBRATION_VERSION}
        name = f"{d.name}-{method}-r{arm.rank}" + (f"-s{seed}" if seed is not None else "") + (
            f"-round{arm.round}" if arm.round > 1 else "")

        def do_calibrate(where: Path) -> dict:
            pack = calibrate(backend.model, backend.tokenizer, backend.model_info, d.task,
                             splits[d.name]["calibration"], name,
                             CalibrationConfig(**narrow(c, CalibrationShape).model_dump(exclude={"rank"}), method=method,
                                               rank=arm.rank, seed=seed if seed is not None else cfg.seed))
            Store(where).save(pack, overwrite=True)
            return {"pack": name}

        stages.run("calibrate", key, do_calibrate)
        calib_key[arm] = key
        if backend is None or name not in backend.capabilities():
            # the results' store (read by the report) gets the cached pack; a served model gets its mode
            pack = Store(stages.dir("calibrate", key)).load(name, backend.model_info if backend else None)
            store.save(pack, overwrite=True)
            if backend is not None:
                backend.add_subspace(pack)
        return name

    def train(backend: HFBackend | None, arm: Arm, mode: str | None) -> None:
        d = domains[arm.domain]  # type: ignore[index]
        capability = (mode,) if mode else ()
        gen_key = {"model": model_key[arm], "data": sources[d.name], "examples": _content(splits[d.name]["generation"]),
                   "kind": d.task, "mode": calib_key.get(arm), "strength": cfg.strength if mode else 0.0,
                   "max_tokens": d.max_tokens, "stop": stop_strings(d.task), "seed": cfg.seed}

        def do_generate(where: Path) -> dict:
            prompts = splits[d.name]["generation"]
            with tqdm(total=len(prompts), desc=f"{arm.name}: generate", unit="ex", file=sys.stderr) as bar:
                return generate_corpus(backend, d.task, prompts, where / "corpus.jsonl", capability=capability,
                                       strength=cfg.strength, max_tokens=d.max_tokens, seed=cfg.seed,
                                       chunk=cfg.batch_size, progress=bar.update)

        stages.run("generate", gen_key, do_generate)
        corpus = stages.dir("generate", gen_key) / "corpus.jsonl"
        if _hash(gen_key) not in seen_corpora:  # one corpus serves every seed of a greedy, seed-free mode
            seen_corpora.add(_hash(gen_key))
            # the seed a corpus depends on: a random subspace's draw, or (round 2 on) the previous round's training
            seeded = _MODE_OF.get(arm.condition) == "random" or arm.round > 1
            corpora.append({"domain": d.name, "arm": replace(arm, seed=None).label, "condition": arm.condition,
                            "rank": arm.rank, "round": arm.round, "seed": arm.seed if seeded else None,
                            **_corpus_quality(d.task, splits[d.name]["generation"], corpus)})

        key = {"corpus": gen_key, "model": model_key[arm], "distill": cfg.distill.model_dump(), "seed": arm.seed}

        def do_distill(where: Path) -> dict:
            model, tok = _merged_model(base_backend.model_info.path, lineage[arm])
            dc = DistillConfig(**cfg.distill.model_dump(), seed=arm.seed)  # type: ignore[arg-type]
            bar = tqdm(desc=f"{arm.name}: distill", unit="step", file=sys.stderr)
            report = distill(model, tok, read_corpus(corpus), where / "adapter", dc,
                             lambda step, total, loss: (setattr(bar, "total", total), bar.update(1)))
            bar.close()
            return {"adapter": "adapter", "train": report}

        distill_key[arm] = key
        # a committed cache keeps each adapter's training report, not the adapter: train again only
        # when something still reads it (an evaluation not yet cached, a later round)
        needs = "adapter" if not cached_only and (cfg.rounds > 1 or pending(arm)) else None
        res = stages.run("distill", key, do_distill, needs=needs)
        adapter_dir[arm] = stages.dir("distill", key) / "adapter"
        t = res["train"]
        training.append({"domain": d.name, "arm": arm.label, "seed": arm.seed, "examples": t["examples"],
                         "steps": t["steps"], "corpus_tokens": t.get("corpus_tokens"),
                         "trained_tokens": t.get("trained_tokens"), "first_loss": t["first_loss"],
                         "last_loss": t["last_loss"], "seconds": t["seconds"],
                         "rebuilt_last_loss": [r["train"]["last_loss"] for r in res.get("rebuilt", [])]})

    def evaluations(arm: Arm, capability: tuple[str, ...]):
        """The arm's evaluations: (evaluation domain, metric, items, stage key) each."""
        for e, metric in evaluation_plan(cfg, arm):
            items = splits[e.name]["evaluation"]
            yield e, metric, items, {
                "version": SCORING_VERSION, "model": model_key[arm], "adapter": distill_key.get(arm),
                "merged": True, "mode": calib_key.get(arm) if capability else None,
                "strength": cfg.strength if capability else 0.0,
                "eval": e.name, "kind": e.task, "examples": _content(items), "data": sources[e.name],
                "metric": metric, "max_tokens": e.max_tokens if metric == "accuracy" else None}

    def pending(arm: Arm) -> bool:
        """A trained arm has an evaluation not yet cached."""
        return not all(stages.cached("evaluate", key) for *_, key in evaluations(arm, ()))

    def evaluate(backend: HFBackend | None, arm: Arm, mode: str | None) -> None:
        """`backend` serves the arm's model as it is (a trained arm: its adapter already merged in);
        None when every evaluation is cached."""
        capability = (mode,) if arm.condition == "hooks-only" and mode else ()
        for e, metric, items, key in evaluations(arm, capability):

            def do_eval(where: Path, e=e, metric=metric, items=items) -> dict:
                if metric == "accuracy":
                    r = accuracy(backend, e.task, items, capability=capability, strength=cfg.strength,
                                 max_tokens=e.max_tokens)
                elif metric == "letter-accuracy":
                    r = letter_accuracy(backend, items, capability=capability, strength=cfg.strength)
                else:
                    r = span_nll_eval(backend, e.task, items, capability=capability, strength=cfg.strength)
                return {"summary": r.summary(), "items": r.items}

            try:
                res = stages.run("evaluate", key, do_eval)
            except NotCached:
                continue
            results.append({"arm": arm.label, "condition": arm.condition, "train_domain": arm.domain,
                            "rank": arm.rank, "seed": arm.seed, "round": arm.round, "eval": e.name,
                            "in_domain": arm.domain is None or arm.domain == e.name, "metric": metric,
                            **res["summary"], "items": res["items"]})

    modes: dict[Arm, str] = {}

    def build(backend: HFBackend | None, arm: Arm) -> None:
        mode = None
        if arm.condition in _MODE_OF:
            mode = modes[arm] if arm in modes else calibrate_mode(backend, arm)
        if arm.condition in TRAINED:
            train(backend, arm, mode)
            if cached_only or not pending(arm):
                evaluate(None, arm, None)
                return
            # evaluated with its adapter merged into a copy of the weights (the same function as the LoRA
            # applied on the fly, without peft's per-request adapter dispatch in every layer)
            trained = _merged_backend(cfg, lineage[arm] + [adapter_dir[arm]],
                                      {"model": model_key[arm], "adapter": distill_key[arm]})
            evaluate(trained, arm, None)
            trained.close()
        else:
            evaluate(backend, arm, mode)

    all_arms = arms(cfg)
    for arm in all_arms:
        if arm.round == 1:
            model_key[arm], lineage[arm] = ident, []
    # round 1 on the base model: its modes, then per arm its corpus, adapter and evaluations (a
    # cached-only run skips each arm at the first stage it would have to compute)
    for arm in all_arms:
        if arm.round == 1 and arm.condition in _MODE_OF:
            with suppress(NotCached):
                modes[arm] = calibrate_mode(base_backend, arm)
    for arm in all_arms:
        if arm.round == 1:
            with suppress(NotCached):
                build(base_backend, arm)
    if base_backend is not None:
        base_backend.close()
    # later rounds: each starts from its parent's model (base + the parent's lineage + the parent's adapter)
    for arm in all_arms:
        parent = arm.parent()
        if arm.round == 1 or parent not in adapter_dir:  # (the parent's training is not cached yet)
            continue
        lineage[arm] = lineage[parent] + [adapter_dir[parent]]
        model_key[arm] = {"base": ident, "adapters": [model_key[parent], distill_key[parent]]}
        backend = None if cached_only else _merged_backend(cfg, lineage[arm], model_key[arm])
        with suppress(NotCached):
            build(backend, arm)
        if backend is not None:
            backend.close()

    from .experiment_report import write_report

    baselines = {d.name: eval_set_baselines(d.task, splits[d.name]["evaluation"]) for d in cfg.domains}
    planned = sum(len(evaluation_plan(cfg, arm)) for arm in all_arms)
    write_report(root, cfg, config_path, results, corpora, training, baselines, store, stages.timings, planned)
    return root
