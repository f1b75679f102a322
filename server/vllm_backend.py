"""The vLLM backend: the same interface as the transformers backend, served by vLLM (its engine core
in this process, or in a process of its own with `engine_process=True`, which the server uses).

One engine thread owns the vLLM engine: it adds and aborts requests, steps the engine while
any request is in flight and hands each request's outputs to its caller's queue; every other
change to the engine (modes, adapters) runs on that thread too, between steps. So concurrent
`generate` and `stream` calls share one continuous batch whatever their modes, strengths and
adapters, and a request that arrives mid-batch joins it at the next step. A request's mode travels in
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
import queue
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Iterator

from spd_engine import models
from spd_engine.backend import Backend, Completion, Delta, GenerationRequest, Progress
from spd_engine.bank import Capability, ProjectionBank
from spd_engine.paths import store_dir
from spd_engine.subspace import PackError, Store, Subspace

from . import vllm_plugin

KV_CACHE_GIB_DEFAULT = "2"


def _engine_env(engine_process: bool) -> None:
    """Where the engine core runs (its own process, as in vLLM's server, or this one: faster start),
    unless VLLM_ENABLE_V1_MULTIPROCESSING says; an explicit KV-cache size for the CPU build (its default
    memory utilisation refuses to start here)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1" if engine_process else "0")
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
                 tensor_parallel_size: int = 1, enable_prefix_caching: bool = True, seed: int = 0,
                 engine_process: bool = False):
        _engine_env(engine_process)
        import torch
        from transformers import AutoTokenizer
        from vllm import LLM

        path = models.resolve(model)
        self.model_info = models.info(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.store = Store(Path(store) if store is not None else store_dir())
        self.batch_size = max_num_seqs  # what one call should hold to fill the engine's batch
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
        # the engine thread: the only thread that touches the engine while the backend is in use
        self._commands: queue.SimpleQueue = queue.SimpleQueue()  # (fn, Future | None), run between steps
        self._sinks: dict[str, queue.SimpleQueue] = {}  # request id -> its caller's queue (engine thread only)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="vllm-engine", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- modes and adapters

    def add_subspace(self, pack: Subspace) -> None:
        pack.check_model(self.model_info)
        target = self.store.path(pack.name)
        stored = target / "manifest.json"
        if not stored.is_file():
            self.store.save(pack)  # workers (maybe other processes) load it by name
        elif stored.read_text() != pack.manifest.model_dump_json(indent=2):
            raise PackError(f"the store {self.store.root} already holds a different pack named {pack.name!r}")
        self._on_engine(lambda: self.engine.collective_rpc("spd_add_mode", args=(pack.name, str(self.store.root))))
        self.bank = self.bank.with_mode(pack)

    def remove_subspace(self, name: str) -> None:
        if name not in self.bank.modes:
            raise KeyError(f"no capability named {name!r} is loaded")
        self.bank = self.bank.without_mode(name)  # refuse new requests first
        self._on_engine(lambda: self.engine.collective_rpc("spd_remove_mode", args=(name,)))

    def capabilities(self) -> list[str]:
        return sorted(self.bank.modes)

    def load_adapter(self, name: str, path: str) -> None:
        from vllm.lora.request import LoRARequest

        def load():
            if not self.engine.vllm_config.lora_config:
                raise RuntimeError("this vLLM backend was started with max_loras=0: LoRA is disabled")
            if name in self._adapters:
                raise ValueError(f"an adapter named {name!r} is already loaded")
            request = LoRARequest(name, next(self._lora_ids), str(Path(path).resolve()))
            if not self.engine.add_lora(request):
                raise RuntimeError(f"vLLM refused the adapter {name!r} at {path}")
            self._adapters[name] = request

        self._on_engine(load)

    def unload_adapter(self, name: str) -> None:
        def unload():  # requests already submitted keep their LoRARequest
            if name not in self._adapters:
                raise KeyError(f"no adapter named {name!r} is loaded")
            self.engine.remove_lora(self._adapters.pop(name).lora_int_id)

        self._on_engine(unload)

    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._commands.put((None, None))  # stop the engine thread; it fails what is still in flight
            self._thread.join()
        self.engine.engine_core.shutdown()

    @property
    def batches_continuously(self) -> bool:
        return True  # every call's requests join the engine thread's running batch at the next step

    # ---------------------------------------------------------------- the engine thread

    def _on_engine(self, fn: Callable[[], object]) -> object:
        """Run `fn` on the engine thread between two steps, and return its result (or raise)."""
        if threading.current_thread() is self._thread:
            return fn()
        if self._closed:
            raise RuntimeError("the vLLM backend is closed")
        done: Future = Future()
        self._commands.put((fn, done))
        return done.result()

    def _loop(self) -> None:
        while True:
            try:  # commands first; block for one only when nothing is in flight
                fn, done = self._commands.get(block=not self._sinks)
            except queue.Empty:
                fn = done = None
            else:
                if fn is None:  # close()
                    self._fail_all(RuntimeError("the vLLM backend is closed"))
                    return
                try:
                    result = fn()
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    if done is not None:
                        done.set_exception(e)
                else:
                    if done is not None:
                        done.set_result(result)
                continue
            try:
                outputs = self.engine.step()
            except BaseException as e:  # noqa: BLE001 - every caller in flight gets the error
                self._fail_all(e)
                continue
            for o in outputs:
                sink = self._sinks.get(o.request_id)
                if sink is not None:
                    sink.put(o)
                    if o.finished:
                        del self._sinks[o.request_id]

    def _fail_all(self, error: BaseException) -> None:
        for sink in self._sinks.values():
            sink.put(error)
        try:
            self.engine.abort_request(list(self._sinks))
        except Exception:  # noqa: BLE001 - the engine may be the thing that broke
            pass
        self._sinks.clear()

    def _start(self, ids: list[str], requests: list[GenerationRequest], sink: queue.SimpleQueue, kind) -> None:
        """Submit the requests together (all or none), their outputs going to `sink`."""
        def submit():
            added: list[str] = []
            try:
                for rid, r in zip(ids, requests):
                    self._submit(rid, r, self.bank, kind)
                    added.append(rid)
                    self._sinks[rid] = sink
            except BaseException:
                self._drop(added)
                raise

        self._on_engine(submit)

    def _drop(self, ids: list[str]) -> None:
        live = [rid for rid in ids if self._sinks.pop(rid, None) is not None]
        if live:
            self.engine.abort_request(live)

    def _cancel(self, ids: list[str]) -> None:
        """Abort requests whose caller went away (no waiting)."""
        if not self._closed:
            self._commands.put((lambda: self._drop(ids), None))

    # ---------------------------------------------------------------- generation

    def _check(self, requests: list[GenerationRequest]) -> None:
        bank = self.bank
        for r in requests:  # refuse the whole call before anything is scheduled
            bank.check(r.capability)
            if r.adapter is not None and r.adapter not in self._adapters:
                raise KeyError(f"unknown adapter {r.adapter!r}; loaded: {', '.join(self.adapters()) or '(none)'}")

    def generate(self, requests: list[GenerationRequest], progress: Progress | None = None) -> list[Completion]:
        from vllm.sampling_params import RequestOutputKind

        self._check(requests)
        ids = [f"spd-{next(self._request_ids)}" for _ in requests]
        sink: queue.SimpleQueue = queue.SimpleQueue()
        self._start(ids, requests, sink, RequestOutputKind.FINAL_ONLY)
        done: dict[str, object] = {}
        try:
            while len(done) < len(ids):
                o = sink.get()
                if isinstance(o, BaseException):
                    raise o
                if o.finished:
                    done[o.request_id] = o
                    if progress:
                        progress(1)
        except BaseException:
            self._cancel(ids)
            raise
        return [self._completion(done[rid]) for rid in ids]

    def stream(self, request: GenerationRequest) -> Iterator[Delta]:
        """The request's text as the engine produces it, one piece per engine step; it shares the
        continuous batch with every other request in flight."""
        from vllm.sampling_params import RequestOutputKind

        self._check([request])
        rid = f"spd-{next(self._request_ids)}"
        sink: queue.SimpleQueue = queue.SimpleQueue()
        self._start([rid], [request], sink, RequestOutputKind.DELTA)
        text, ids, finished = [], [], False
        try:
            while not finished:
                o = sink.get()
                if isinstance(o, BaseException):
                    raise o
                out, finished = o.outputs[0], o.finished
                text.append(out.text)
                ids.extend(out.token_ids)
                if finished:
                    yield Delta(out.text, self._completion_of("".join(text), ids, out))
                elif out.text:
                    yield Delta(out.text)
        finally:
            if not finished:  # the caller stopped early (client gone) or an error: free the slot
                self._cancel([rid])

    def _submit(self, rid: str, r: GenerationRequest, bank: ProjectionBank, output_kind=None) -> None:
        """Add one request to the engine (on the engine thread)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        bank.check(r.capability)  # a mode removed since the caller's check is refused, not ignored
        if r.adapter is not None and r.adapter not in self._adapters:
            raise KeyError(f"unknown adapter {r.adapter!r}; loaded: {', '.join(self.adapters()) or '(none)'}")
        cap: Capability = r.capability if r.strength > 0 else ()
        prompt = TokensPrompt(prompt_token_ids=list(r.prompt_ids))
        salt = cache_salt([bank.modes[n] for n in cap], r.strength)
        if salt is not None:
            prompt["cache_salt"] = salt
        params = SamplingParams(
            max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p, seed=r.seed,
            stop=list(r.stop) or None, ignore_eos=r.ignore_eos,
            extra_args=vllm_plugin.extra_args_for(cap, r.strength),
            **({"output_kind": output_kind} if output_kind is not None else {}),
        )
        lora = self._adapters[r.adapter] if r.adapter is not None else None
        self.engine.add_request(rid, prompt, params, lora_request=lora)

    @staticmethod
    def _completion(output) -> Completion:
        o = output.outputs[0]
        return VLLMBackend._completion_of(o.text, list(o.token_ids), o)

    @staticmethod
    def _completion_of(text: str, ids: list[int], o) -> Completion:
        if o.finish_reason == "stop" and o.stop_reason is None and ids:
            ids = ids[:-1]  # vLLM keeps the end-of-sequence token; the interface does not
        return Completion(text, ids, "stop" if o.finish_reason == "stop" else "length")
