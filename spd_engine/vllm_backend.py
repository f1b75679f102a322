"""The vLLM backend for the library and CLI: the same interface as the transformers backend,
served by vLLM's offline engine (`LLM`) in this process.

A request's mode travels in `SamplingParams.extra_args`; the `spd_kv_projection` plugin (loaded
by vLLM in every process through its entry point) validates it, salts the prefix cache per mode
and projects K/V in the workers. The modes this backend serves are copies of packs in a private
store directory (the plugin serves a store): `add_subspace` saves one there, `remove_subspace`
deletes it; the workers load a pack when a request first names it. Adapters go through vLLM's LoRA.
For serving, use `spd serve` (vLLM's own OpenAI server with this project's plugins)."""
from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path

from . import models
from .backend import Backend, Completion, GenerationRequest, Progress
from .subspace import PackError, Store, Subspace
from .vllm_requests import completion_of, sampling_params, tokens_prompt

KV_CACHE_GIB_DEFAULT = "2"


class VLLMBackend(Backend):
    name = "vllm"

    def __init__(self, model: str, *, enforce_eager: bool = True, dtype: str = "float32",
                 max_model_len: int = 2048, max_num_seqs: int = 32, max_loras: int = 2, max_lora_rank: int = 16,
                 tensor_parallel_size: int = 1, enable_prefix_caching: bool = True, seed: int = 0):
        # dtype: float32 by default, where a request's greedy tokens do not depend on its batch
        # (vLLM's bfloat16 kernels change them with the batch, with or without the plugin)
        self.store = Store(Path(tempfile.mkdtemp(prefix="spd-vllm-modes-")))
        # the plugin reads the store from the environment (worker processes inherit it)
        os.environ["SPD_STORE_DIR"] = str(self.store.root)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process: faster start
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB_DEFAULT)  # the CPU default refuses to start
        import torch
        from transformers import AutoTokenizer
        from vllm import LLM

        path = models.resolve(model)
        self.model_info = models.info(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.batch_size = max_num_seqs
        if "OMP_NUM_THREADS" not in os.environ and os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0":
            # the in-process worker binds itself to one core; more OpenMP threads thrash (~10x slower)
            torch.set_num_threads(1)
        self.llm = LLM(
            model=str(path), dtype=dtype, enforce_eager=enforce_eager, seed=seed,
            distributed_executor_backend="uni" if tensor_parallel_size == 1 else "mp",
            tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            enable_prefix_caching=enable_prefix_caching, enable_lora=max_loras > 0,
            **({"max_loras": max_loras, "max_lora_rank": max_lora_rank} if max_loras > 0 else {}),
        )
        self._adapters: dict[str, object] = {}  # name -> LoRARequest
        self._lora_ids = itertools.count(1)

    def add_subspace(self, pack: Subspace) -> None:
        pack.check_model(self.model_info)
        stored = self.store.path(pack.name) / "manifest.json"
        if not stored.is_file():
            self.store.save(pack)
        elif stored.read_text() != pack.manifest.model_dump_json(indent=2):
            raise PackError(f"the store {self.store.root} already holds a different pack named {pack.name!r}")

    def remove_subspace(self, name: str) -> None:
        if name not in self.store.names():
            raise KeyError(f"no capability named {name!r} is loaded")
        self.store.delete(name)

    def capabilities(self) -> list[str]:
        return self.store.names()

    def load_adapter(self, name: str, path: str) -> None:
        from vllm.lora.request import LoRARequest

        if not self.llm.llm_engine.vllm_config.lora_config:
            raise RuntimeError("this vLLM backend was started with max_loras=0: LoRA is disabled")
        if name in self._adapters:
            raise ValueError(f"an adapter named {name!r} is already loaded")
        request = LoRARequest(name, next(self._lora_ids), str(Path(path).resolve()))
        if not self.llm.llm_engine.add_lora(request):
            raise RuntimeError(f"vLLM refused the adapter {name!r} at {path}")
        self._adapters[name] = request

    def unload_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise KeyError(f"no adapter named {name!r} is loaded")
        self.llm.llm_engine.remove_lora(self._adapters.pop(name).lora_int_id)

    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    def generate(self, requests: list[GenerationRequest], progress: Progress | None = None) -> list[Completion]:
        unknown = sorted({r.adapter for r in requests if r.adapter is not None} - set(self._adapters))
        if unknown:
            raise KeyError(f"unknown adapter {unknown[0]!r}; loaded: {', '.join(self.adapters()) or '(none)'}")
        outs = self.llm.generate([tokens_prompt(r) for r in requests], [sampling_params(r) for r in requests],
                                 lora_request=[self._adapters.get(r.adapter) for r in requests], use_tqdm=False)
        if progress:
            progress(len(requests))
        return [completion_of(o) for o in outs]

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
        shutil.rmtree(self.store.root, ignore_errors=True)
