"""What the resource routes and jobs work with inside vLLM's API server: the store, the job store
and worker, the adapters (vLLM's runtime LoRA), and a `Backend` over vLLM's engine client, so
generate and evaluate jobs join the continuous batch that serves live traffic."""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import logging
import threading
from pathlib import Path

from spd_engine import models
from spd_engine.atomic import write_json
from spd_engine.backend import Backend, Completion, GenerationRequest, Progress
from spd_engine.paths import child
from spd_engine.subspace import PackError, Store, Subspace
from spd_engine.vllm_requests import completion_of, sampling_params, tokens_prompt

from .settings import Settings
from .vllm_plugin import RETAINED, pack_digest


def prune_retained(store: Store) -> None:
    """Drop the retained bases (see `server.vllm_plugin.retain`) of packs no longer in the store:
    at start no request admitted earlier is left."""
    import shutil

    root = store.root / RETAINED
    if not root.is_dir():
        return
    keep = set()
    for name in store.names():
        try:
            keep.add(pack_digest(store.path(name)))
        except OSError:
            continue
    for d in root.iterdir():
        if d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)

log = logging.getLogger("spd.server")


class EngineClientBackend(Backend):
    """The serving engine as a `Backend` for jobs (called from the job worker's thread): each
    request goes to vLLM's engine client on the server's event loop, so it shares the running
    batch with HTTP requests, and is admitted by the plugin like any request."""

    name = "vllm"

    def __init__(self, server: "SPDServer"):
        self.server = server
        self.model_info, self.tokenizer = server.model_info, server.tokenizer
        self.batch_size = 64  # requests a job submits at once (the engine batches them with live traffic)
        self._ids = itertools.count()

    def generate(self, requests: list[GenerationRequest], progress: Progress | None = None) -> list[Completion]:
        fut = asyncio.run_coroutine_threadsafe(self._all(requests, progress), self.server.loop)
        try:
            while True:
                try:
                    return fut.result(timeout=0.5)
                except concurrent.futures.TimeoutError:
                    if progress:
                        progress(0)  # nothing new; a cancelled job's progress callback raises here
        except BaseException:
            fut.cancel()  # a cancelled job: its requests are aborted in the engine
            raise

    async def _all(self, requests: list[GenerationRequest], progress: Progress | None) -> list[Completion]:
        async def one(r: GenerationRequest) -> Completion:
            lora = self.server.lora_request(r.adapter) if r.adapter else None
            final = None
            async for out in self.server.engine.generate(tokens_prompt(r), sampling_params(r),
                                                         f"spd-job-{next(self._ids)}", lora_request=lora):
                final = out
            if progress:
                progress(1)
            return completion_of(final)

        return list(await asyncio.gather(*(one(r) for r in requests)))

    def add_subspace(self, pack: Subspace) -> None:
        raise NotImplementedError("the server serves the store: save packs there")

    def remove_subspace(self, name: str) -> None:
        raise NotImplementedError("the server serves the store: delete packs there")

    def capabilities(self) -> list[str]:
        return self.server.capabilities()

    def load_adapter(self, name: str, path: str) -> None:
        self.server.call(self.server.load_adapter(name, Path(path)))

    def unload_adapter(self, name: str) -> None:
        self.server.call(self.server.unload_adapter(name))

    def adapters(self) -> list[str]:
        return self.server.adapters()


class AdapterError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class SPDServer:
    """The resource API's state, one per vLLM API server process (`app.state.spd`)."""

    def __init__(self, engine_client, app_state, args, settings: Settings):
        from .jobs import JobStore, Worker
        from . import steps

        self.engine, self.app_state, self.settings = engine_client, app_state, settings
        self.loop = asyncio.get_running_loop()
        self.model_path = Path(engine_client.model_config.model)
        names = getattr(args, "served_model_name", None) or [str(self.model_path)]
        self.model_id = names[0] if isinstance(names, list) else names
        self.model_info = models.info(self.model_path)
        self.max_model_len = engine_client.model_config.max_model_len
        self.tokenizer = engine_client.get_tokenizer()  # the served one: loading a second copy costs start time
        self.store = Store(settings.store_dir)
        self.lock = threading.RLock()  # serialises store changes (import, delete) with admission checks
        for d in (settings.data_dir, settings.adapters_dir, settings.jobs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.backend = EngineClientBackend(self)
        self.jobs = JobStore(settings.db_path)
        self.worker = Worker(self.jobs, settings.jobs_dir, steps.make_runners(self, self.jobs))
        self.worker.start()
        prune_retained(self.store)
        log.info("spd_api: store %s, data %s, modes %s", settings.store_dir, settings.data_dir, self.capabilities())

    async def restore_adapters(self) -> None:
        """Load again the adapters that were loaded when the server last stopped."""
        for name, path in self._saved_adapters().items():
            try:
                await self.load_adapter(name, Path(path), persist=False)
                log.info("spd_api: adapter %s loaded again from %s", name, path)
            except (AdapterError, OSError) as e:
                log.error("spd_api: adapter %s (%s) was loaded before the restart but cannot be now: %s", name, path, e)

    def _saved_adapters(self) -> dict[str, str]:
        try:
            saved = json.loads(self.settings.adapters_file.read_text())
        except (OSError, ValueError):
            return {}
        return {n: p for n, p in saved.items() if isinstance(n, str) and isinstance(p, str)} if isinstance(saved, dict) else {}

    def _persist_adapters(self) -> None:
        write_json(self.settings.adapters_file, self.adapter_paths())

    async def abort_admitted(self, name: str) -> None:
        """Abort the requests admitted in a mode that was just deleted (they fail with an abort;
        any that already finished are ignored)."""
        from .vllm_plugin import PLUGIN

        ids = PLUGIN.front.take_admitted(name)
        if ids:
            await self.engine.abort(ids)

    # ------------------------------------------------------------ modes (the store is what is served)

    def capabilities(self) -> list[str]:
        """The store's packs that are valid for the served model."""
        from .vllm_plugin import PLUGIN

        out = []
        for name in self.store.names():
            try:
                PLUGIN.front.digest(self.store, name, self.model_info)  # validated once per content
            except (PackError, KeyError, ValueError):
                continue
            out.append(name)
        return out

    def add_mode(self, name: str) -> None:
        """Check a pack just written to the store: it is served from the next request on."""
        self.store.load(name, self.model_info)

    # ------------------------------------------------------------ adapters (vLLM's runtime LoRA)

    @property
    def lora_enabled(self) -> bool:
        return self.engine.vllm_config.lora_config is not None

    def _models(self):
        return self.app_state.openai_serving_models

    def adapters(self) -> list[str]:
        return sorted(self._models().lora_requests) if self.lora_enabled else []

    def adapter_paths(self) -> dict[str, str]:
        return {n: r.lora_path for n, r in self._models().lora_requests.items()} if self.lora_enabled else {}

    def lora_request(self, name: str):
        req = self._models().lora_requests.get(name) if self.lora_enabled else None
        if req is None:
            raise KeyError(f"unknown adapter {name!r}; loaded: {', '.join(self.adapters()) or '(none)'}")
        return req

    def check_lora_enabled(self) -> None:
        if not self.lora_enabled:
            raise AdapterError(409, "LoRA is not enabled on this server: start it with --enable-lora "
                                    "(and --max-lora-rank at least the adapter's rank)")

    async def load_adapter(self, name: str, path: Path, persist: bool = True) -> None:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        self.check_lora_enabled()
        if name in self.adapters() or name == self.model_id:
            raise AdapterError(409, f"an adapter named {name!r} is already loaded")
        res = await self._models().load_lora_adapter(LoadLoRAAdapterRequest(lora_name=name, lora_path=str(path)))
        if isinstance(res, ErrorResponse):
            raise AdapterError(422, f"the adapter does not load on this model: {res.error.message}")
        if persist:
            self._persist_adapters()

    async def unload_adapter(self, name: str) -> None:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

        if name not in self.adapters():
            raise KeyError(name)
        res = await self._models().unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
        if isinstance(res, ErrorResponse):
            raise AdapterError(422, res.error.message)
        self._persist_adapters()

    def adapter_dir(self, name: str) -> Path:
        return child(self.settings.adapters_dir, name, "adapter directory")

    def call(self, coro):
        """Run a coroutine on the server's loop from another thread (the job worker) and wait."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.worker.stop()
