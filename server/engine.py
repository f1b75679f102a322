"""The serving engine as the server sees it: one Backend, the subspace store, the adapters dir,
and the operations that change what the backend serves (modes and adapters, hot)."""
from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path

from spd_engine.backend import Backend
from spd_engine.paths import child
from spd_engine.subspace import PackError, Store

from .settings import Settings

log = logging.getLogger("spd.engine")


def vllm_available() -> bool:
    if importlib.util.find_spec("server.vllm_backend") is None or importlib.util.find_spec("vllm") is None:
        return False
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return False
    return True


def make_backend(settings: Settings) -> Backend:
    choice = settings.backend
    if choice == "auto":
        choice = "vllm" if vllm_available() else "hf"
    if choice == "vllm":
        from server.vllm_backend import VLLMBackend

        # the engine core in its own process, as in vLLM's server: HTTP work does not wait on model steps
        return VLLMBackend(settings.model, store=settings.store_dir, engine_process=True)
    if choice != "hf":
        raise ValueError(f"unknown backend {settings.backend!r}: use auto, vllm or hf")
    from spd_engine.hf_backend import HFBackend

    return HFBackend(settings.model, batch_size=settings.hf_batch_size)


class Engine:
    def __init__(self, settings: Settings, backend: Backend):
        self.settings, self.backend = settings, backend
        self.store = Store(Path(settings.store_dir))
        self.adapter_paths: dict[str, str] = {}
        self.lock = threading.RLock()  # serialises changes to modes and adapters

    @property
    def model_id(self) -> str:
        return self.settings.model

    def load_store(self) -> None:
        """Register every valid pack of the store that belongs to this model; skip the others."""
        for name in self.store.names():
            try:
                self.add_mode(name)
            except (PackError, KeyError, ValueError) as e:
                log.warning("subspace %s not served: %s", name, e)

    def add_mode(self, name: str) -> None:
        with self.lock:
            pack = self.store.load(name, self.backend.model_info)
            if name in self.backend.capabilities():
                self.backend.remove_subspace(name)
            self.backend.add_subspace(pack)

    def remove_mode(self, name: str) -> None:
        with self.lock:
            if name in self.backend.capabilities():
                self.backend.remove_subspace(name)

    def load_adapter(self, name: str, path: Path) -> None:
        with self.lock:
            self.backend.load_adapter(name, str(path))
            self.adapter_paths[name] = str(path)

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            self.backend.unload_adapter(name)
            self.adapter_paths.pop(name, None)

    def adapter_dir(self, name: str) -> Path:
        return child(self.settings.adapters_dir, name, "adapter directory")
