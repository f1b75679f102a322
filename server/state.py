"""What the resource routes and jobs work with inside vLLM's API server: the store, the job store
and worker, the adapters (vLLM's runtime LoRA), and a `Backend` over vLLM's engine client, so
generate and evaluate jobs join the continuous batch that serves live traffic."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import logging
import threading
from pathlib import Path

from spd_engine import models
from spd_engine.admission import Admission
from spd_engine.atomic import write_json
from spd_engine.backend import Backend, Completion, GenerationRequest, Progress
from spd_engine.paths import child
from spd_engine.subspace import Store, Subspace
from spd_engine.vllm_requests import completion_of, sampling_params, tokens_prompt

from .jobs import JobStore, Worker
from .settings import Settings

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


class SharedLoRAIds:
    """Named fix `lora_ids_per_api_server` (vllm/entrypoints/openai/models/serving.py): vLLM numbers
    runtime-loaded adapters with a counter per API-server process (`OpenAIServingModels.
    lora_id_counter`), and the engine knows an adapter only by that number, so under
    `--api-server-count 2` two processes give two different adapters the same id and requests get
    the wrong weights. This drop-in counter is shared by the processes (the job store's SQLite)."""

    def __init__(self, jobs):
        self.jobs = jobs

    def inc(self, num: int = 1) -> int:
        value = 0
        for _ in range(num):
            value = self.jobs.next_number("lora_int_id")
        return value


class AdapterError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class SPDServer:
    """The resource API's state, one per vLLM API server process (`app.state.spd`)."""

    def __init__(self, engine_client, app_state, args, settings: Settings, admission: Admission, jobs: JobStore):
        self.engine, self.app_state, self.settings = engine_client, app_state, settings
        self.stopping = False  # vLLM is shutting the engine down (SIGTERM/SIGINT): its end is not a death
        shutdown = engine_client.shutdown

        def stop_engine(*args, **kwargs):
            self.stopping = True
            return shutdown(*args, **kwargs)

        engine_client.shutdown = stop_engine
        self.loop = asyncio.get_running_loop()
        self.model_path = Path(engine_client.model_config.model)
        names = getattr(args, "served_model_name", None) or [str(self.model_path)]
        self.model_id = names[0] if isinstance(names, list) else names
        self.model_info = models.info(self.model_path)
        self.max_model_len = engine_client.model_config.max_model_len
        self.vocab_size = engine_client.model_config.get_vocab_size()
        self.tokenizer = engine_client.get_tokenizer()  # the served one: loading a second copy costs start time
        self.store = Store(settings.store_dir)
        self.admission = admission  # the engine plugin's front end in this process: what it admits is served
        self.lock = threading.RLock()  # serialises store changes (import, delete) with admission checks
        for d in (settings.data_dir, settings.adapters_dir, settings.jobs_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.backend = EngineClientBackend(self)
        self.jobs = jobs
        self.worker: Worker | None = None  # started by init_state once this server exists (it is the steps' host)
        self._adapters_lock = asyncio.Lock()  # this process's adapter changes and syncs, one at a time
        self._adapters_seen: tuple | None = None  # the adapters file's stat when this process last read it
        if self.lora_enabled:
            self._models().lora_id_counter = SharedLoRAIds(self.jobs)
        self.store.prune_retained()
        log.info("spd_api: store %s, data %s, modes %s", settings.store_dir, settings.data_dir, self.capabilities())

    async def follow_adapters(self) -> None:
        """At start: serve the adapters of the adapters file (loaded when the server last stopped,
        or by another API-server process of this server), each under the id it was loaded with;
        then follow the file while the server runs."""
        if self.lora_enabled and any(e["id"] is None for e in self._read_adapters().values()):
            self._write_adapters(self._give_ids)
        await self.sync_adapters(validate=True)
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.sync_adapters()
            except Exception:  # noqa: BLE001 - keep following; the next change is read again
                log.exception("spd_api: reading the adapters file failed")

    def _read_adapters(self) -> dict[str, dict]:
        """The adapters file: {name: {"path": str, "id": int | None}} (an older {name: path} has no
        ids: `_give_ids` writes them once)."""
        try:
            saved = json.loads(self.settings.adapters_file.read_text())
        except (OSError, ValueError):
            return {}
        out = {}
        for name, entry in (saved.items() if isinstance(saved, dict) else ()):
            entry = {"path": entry} if isinstance(entry, str) else entry
            if isinstance(name, str) and isinstance(entry, dict) and isinstance(entry.get("path"), str):
                ident = entry.get("id")
                out[name] = {"path": entry["path"], "id": ident if isinstance(ident, int) and ident > 0 else None}
        return out

    def _give_ids(self, entries: dict) -> None:
        """Ids for entries that have none, from the shared counter: done under the file lock, so
        every API-server process reads the same ids."""
        for entry in entries.values():
            if entry["id"] is None:
                entry["id"] = self.jobs.next_number("lora_int_id")

    @contextlib.contextmanager
    def _adapters_file_locked(self):
        """The adapters file, read and written by one process at a time."""
        import fcntl

        with open(self.settings.data_dir / "adapters.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _write_adapters(self, change) -> None:
        with self._adapters_file_locked():
            entries = self._read_adapters()
            change(entries)
            write_json(self.settings.adapters_file, entries)
            self._adapters_seen = self._adapters_stat()

    def _adapters_stat(self) -> tuple | None:
        try:
            st = self.settings.adapters_file.stat()
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    async def sync_adapters(self, validate: bool = False) -> None:
        """Make this process's adapters those of the adapters file (what other API-server processes
        loaded or unloaded). `validate`: load each into the engine now (an adapter that no longer
        loads is logged and not served) instead of on its first request."""
        from vllm.lora.request import LoRARequest

        if not self.lora_enabled or self._adapters_stat() == self._adapters_seen:
            return
        async with self._adapters_lock:
            self._adapters_seen = self._adapters_stat()
            entries = {n: e for n, e in self._read_adapters().items() if e["id"] is not None}
            served = self._models().lora_requests
            for name in [n for n in served if n not in entries]:
                del served[name]
            for name, entry in entries.items():
                known = served.get(name)
                if known is not None and known.lora_int_id == entry["id"] and known.lora_path == entry["path"]:
                    continue
                req = LoRARequest(lora_name=name, lora_int_id=entry["id"], lora_path=entry["path"])
                if validate:
                    try:
                        await self.engine.add_lora(req)
                    except Exception as e:  # noqa: BLE001 - one broken adapter must not stop the server
                        log.error("spd_api: adapter %s (%s) was loaded before but cannot be now: %s", name,
                                  entry["path"], e)
                        continue
                served[name] = req

    async def abort_admitted(self, name: str) -> None:
        """Abort the requests admitted in a mode that was just deleted (they fail with an abort;
        any that already finished are ignored)."""
        ids = self.admission.take_admitted(name)
        if ids:
            await self.engine.abort(ids)

    # ------------------------------------------------------------ modes (the store is what is served)

    def capabilities(self) -> list[str]:
        """The store's packs that are valid for the served model (validated once per content)."""
        return list(self.admission.servable(self.model_info))

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

    async def load_adapter(self, name: str, path: Path) -> None:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        self.check_lora_enabled()
        await self.sync_adapters()
        async with self._adapters_lock:
            if name in self.adapters() or name == self.model_id:
                raise AdapterError(409, f"an adapter named {name!r} is already loaded")
            res = await self._models().load_lora_adapter(LoadLoRAAdapterRequest(lora_name=name, lora_path=str(path)))
            if isinstance(res, ErrorResponse):
                raise AdapterError(422, f"the adapter does not load on this model: {res.error.message}")
            req = self._models().lora_requests[name]

            def add(entries: dict) -> None:
                if name in entries:  # another API-server process loaded one under this name meanwhile
                    del self._models().lora_requests[name]
                    raise AdapterError(409, f"an adapter named {name!r} is already loaded")
                entries[name] = {"path": req.lora_path, "id": req.lora_int_id}

            self._write_adapters(add)

    async def unload_adapter(self, name: str) -> None:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

        await self.sync_adapters()
        async with self._adapters_lock:
            if name not in self.adapters():
                raise KeyError(name)
            res = await self._models().unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
            if isinstance(res, ErrorResponse):
                raise AdapterError(422, res.error.message)
            self._write_adapters(lambda entries: entries.pop(name, None))

    def adapter_dir(self, name: str) -> Path:
        return child(self.settings.adapters_dir, name, "adapter directory")

    def call(self, coro):
        """Run a coroutine on the server's loop from another thread (the job worker) and wait."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    @property
    def engine_died(self) -> bool:
        """The engine ended without vLLM shutting it down (a crash, or its process killed)."""
        return self.engine.errored and not self.stopping

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
