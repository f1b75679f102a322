"""The vLLM backend: the same interface as the transformers backend, served by vLLM in-process.

All requests of one `generate` call are submitted together, so vLLM batches them continuously
whatever their modes, strengths and adapters. A request's mode travels in
`SamplingParams.extra_args`; the plugin (`server.vllm_plugin`) projects its K/V in the workers.
Modes reach the workers by name from a subspace store directory (`collective_rpc`, so it works
with worker processes too); adapters go through vLLM's own LoRA support.

Prefix-cache isolation: a request with a mode carries a cache salt derived from the modes'
identity (name and manifest) and the strength, so KV blocks computed under one mode are never
served to another; requests without a mode (or at strength 0, which is the plain model) carry no
salt and share the base prefix cache.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import threading
from pathlib import Path

from spd_engine import models
from spd_engine.backend import Backend, Completion, GenerationRequest, Progress
from spd_engine.bank import Capability, ProjectionBank
from spd_engine.paths import store_dir
from spd_engine.subspace import PackError, Store, Subspace

from . import vllm_plugin

KV_CACHE_GIB_DEFAULT = "2"


def _engine_env() -> None:
    """Defaults the CPU build needs: an in-process engine (fast start, one process), an explicit
    KV-cache size (the default memory utilisation refuses to start here)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB_DEFAULT)


def cache_salt(packs: list[Subspace], strength: float) -> str | None:
    """The prefix-cache salt of a mode: changes with the modes' identity and the strength."""
    if not packs or strength == 0:
        return None
    h = hashlib.sha256(repr(strength).encode())
    for p in sorted(packs, key=lambda p: p.name):
        h.update(p.manifest.model_dump_json().encode())
    return f"spd-{h.hexdigest()[:32]}"


class VLLMBackend(Backend):
    name = "vllm"

    def __init__(self, model: str, *, store: str | Path | None = None, enforce_eager: bool = True,
                 max_model_len: int = 2048, max_num_seqs: int = 32, max_loras: int = 2, max_lora_rank: int = 16,
                 tensor_parallel_size: int = 1, enable_prefix_caching: bool = True, seed: int = 0):
        _engine_env()
        import torch
        from transformers import AutoTokenizer
        from vllm import LLM

        path = models.resolve(model)
        self.model_info = models.info(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.store = Store(Path(store) if store is not None else store_dir())
        if "OMP_NUM_THREADS" not in os.environ and os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0":
            # the in-process worker binds itself to one core; more OpenMP threads thrash (~10x slower)
            torch.set_num_threads(1)
        vllm_plugin.register()  # this process hosts the worker (uni); harmless if vLLM also loads it
        self.llm = LLM(
            model=str(path), dtype="float32", enforce_eager=enforce_eager, seed=seed,
            distributed_executor_backend="uni" if tensor_parallel_size == 1 else "mp",
            tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            enable_prefix_caching=enable_prefix_caching, enable_lora=max_loras > 0,
            **({"max_loras": max_loras, "max_lora_rank": max_lora_rank} if max_loras > 0 else {}),
        )
        self.engine = self.llm.llm_engine
        try:
            self.engine.collective_rpc("spd_modes")
        except AttributeError:
            raise RuntimeError("the spd_kv_projection vLLM plugin is not loaded in the workers: install the "
                               "project (pip install -e .) so its vllm.general_plugins entry point exists") from None
        self.bank = ProjectionBank()  # front-end view of the workers' modes: validation and salts
        self._adapters: dict[str, object] = {}  # name -> LoRARequest
        self._lora_ids = itertools.count(1)
        self._request_ids = itertools.count()
        self._lock = threading.Lock()  # the offline engine is driven by one caller at a time

    # ---------------------------------------------------------------- modes and adapters

    def add_subspace(self, pack: Subspace) -> None:
        pack.check_model(self.model_info)
        target = self.store.path(pack.name)
        stored = target / "manifest.json"
        if not stored.is_file():
            self.store.save(pack)  # workers (maybe other processes) load it by name
        elif stored.read_text() != pack.manifest.model_dump_json(indent=2):
            raise PackError(f"the store {self.store.root} already holds a different pack named {pack.name!r}")
        with self._lock:
            self.engine.collective_rpc("spd_add_mode", args=(pack.name, str(self.store.root)))
            self.bank = self.bank.with_mode(pack)

    def remove_subspace(self, name: str) -> None:
        with self._lock:
            if name not in self.bank.modes:
                raise KeyError(f"no capability named {name!r} is loaded")
            self.bank = self.bank.without_mode(name)  # refuse new requests first
            self.engine.collective_rpc("spd_remove_mode", args=(name,))

    def capabilities(self) -> list[str]:
        return sorted(self.bank.modes)

    def load_adapter(self, name: str, path: str) -> None:
        from vllm.lora.request import LoRARequest

        with self._lock:
            if not self.engine.vllm_config.lora_config:
                raise RuntimeError("this vLLM backend was started with max_loras=0: LoRA is disabled")
            if name in self._adapters:
                raise ValueError(f"an adapter named {name!r} is already loaded")
            request = LoRARequest(name, next(self._lora_ids), str(Path(path).resolve()))
            if not self.engine.add_lora(request):
                raise RuntimeError(f"vLLM refused the adapter {name!r} at {path}")
            self._adapters[name] = request

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self._adapters:
                raise KeyError(f"no adapter named {name!r} is loaded")
            self.engine.remove_lora(self._adapters.pop(name).lora_int_id)

    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    def close(self) -> None:
        self.engine.engine_core.shutdown()

    # ---------------------------------------------------------------- generation

    def generate(self, requests: list[GenerationRequest], progress: Progress | None = None) -> list[Completion]:
        bank = self.bank
        for r in requests:  # refuse the whole call before anything is scheduled
            bank.check(r.capability)
            if r.adapter is not None and r.adapter not in self._adapters:
                raise KeyError(f"unknown adapter {r.adapter!r}; loaded: {', '.join(self.adapters()) or '(none)'}")
        with self._lock:
            ids = [f"spd-{next(self._request_ids)}" for _ in requests]
            try:
                for rid, r in zip(ids, requests):
                    self._submit(rid, r, bank)
                outputs = self._run(set(ids), progress)
            except BaseException:
                self.engine.abort_request(ids)
                raise
        return [self._completion(outputs[rid]) for rid in ids]

    def _submit(self, rid: str, r: GenerationRequest, bank: ProjectionBank) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        cap: Capability = r.capability if r.strength > 0 else ()
        prompt = TokensPrompt(prompt_token_ids=list(r.prompt_ids))
        salt = cache_salt([bank.modes[n] for n in cap], r.strength)
        if salt is not None:
            prompt["cache_salt"] = salt
        params = SamplingParams(
            max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p, seed=r.seed,
            stop=list(r.stop) or None, ignore_eos=r.ignore_eos,
            extra_args=vllm_plugin.extra_args_for(cap, r.strength),
        )
        lora = self._adapters.get(r.adapter) if r.adapter is not None else None
        self.engine.add_request(rid, prompt, params, lora_request=lora)

    def _run(self, pending: set[str], progress: Progress | None) -> dict[str, object]:
        """Step the engine until every request in `pending` has finished."""
        done: dict[str, object] = {}
        while len(done) < len(pending):
            finished = [o for o in self.engine.step() if o.finished and o.request_id in pending]
            for o in finished:
                done[o.request_id] = o
            if finished and progress:
                progress(len(finished))
        return done

    @staticmethod
    def _completion(output) -> Completion:
        o = output.outputs[0]
        ids = list(o.token_ids)
        if o.finish_reason == "stop" and o.stop_reason is None and ids:
            ids = ids[:-1]  # vLLM keeps the end-of-sequence token; the interface does not
        return Completion(o.text, ids, "stop" if o.finish_reason == "stop" else "length")
