"""Admitting a request that names a mode, before it is scheduled: the names and strength are
checked against the store, each pack's digest is recorded in the request's extra_args (the worker
projects with exactly those bases), and the request's prefix-cache salt is made from the digests,
the strength and any client salt, so KV blocks computed under one mode (or other bases under the
same name) are never served to another. The engine plugin runs it in vLLM's front end; it knows
nothing of vLLM (`AdmissionError` names the field, the plugin turns it into vLLM's 400)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from array import array
from typing import Any

from .auto import AUTO_MODE
from .bank import Capability
from .models import ModelInfo
from .subspace import PACK_FILES, Store
from .vllm_requests import AUTO_KEY_ARG, CAPABILITY_ARG, DIGESTS_ARG, parse_extra_args

MAX_COMPOSED = 8  # modes one request may compose
MAX_TRACKED = 4096  # admitted request ids remembered per mode (for aborting them when it is deleted)
MAX_AUTO_CANDIDATES = 64  # modes capability auto chooses among (a worker keeps 64 loaded)


class AdmissionError(ValueError):
    """A request that cannot be served as asked: `parameter` is the extra_args field at fault."""

    def __init__(self, message: str, parameter: str, value: Any = None):
        super().__init__(message)
        self.parameter, self.value = parameter, value


class Admission:
    """One process's admission: each valid pack's digest, validated once per content, and the ids
    of the requests admitted in each mode (the server aborts them when the mode is deleted)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._known: dict[str, tuple[tuple, str]] = {}  # name -> (stat signature, digest) of a valid pack
        self._admitted: dict[str, dict[str, None]] = {}  # name -> ids of requests admitted in it (recent first out)
        self._lock = threading.Lock()

    def digest(self, name: str, model: ModelInfo) -> str:
        """A valid pack's digest (PackError, KeyError otherwise); its files are retained under it."""
        path = self.store.path(name)
        try:
            sig = tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in (os.stat(path / m) for m in PACK_FILES))
        except OSError:
            raise KeyError(name) from None
        with self._lock:
            hit = self._known.get(name)
        if hit is not None and hit[0] == sig:
            return hit[1]
        self.store.load(name, model)  # full validation against the served model
        digest = self.store.digest(name)
        self.store.retain(name, digest)
        with self._lock:
            self._known[name] = (sig, digest)
        return digest

    def servable(self, model: ModelInfo) -> dict[str, str]:
        """Every valid pack of the store for `model`, with its digest."""
        out = {}
        for name in self.store.names():
            with contextlib.suppress(KeyError, ValueError):  # an invalid pack is never served
                out[name] = self.digest(name, model)
        return out

    def take_admitted(self, name: str) -> list[str]:
        """The ids of requests admitted in mode `name` (forgotten here)."""
        with self._lock:
            return list(self._admitted.pop(name, {}))

    def admit(self, extra_args: dict | None, client_salt: str | None, model: ModelInfo, request_id: str = "",
              prompt_ids: list[int] | None = None, model_parallel: int = 1) -> tuple[dict | None, str | None]:
        """One request's (extra_args, cache salt) as it will be served; AdmissionError if it cannot be."""
        try:
            cap, strength = parse_extra_args(extra_args)
        except ValueError as e:
            raise AdmissionError(str(e), parameter=str(e).split()[0]) from None
        if not cap:
            return extra_args, client_salt
        if AUTO_MODE in cap:
            return self._admit_auto(extra_args, cap, strength, client_salt, model, request_id, prompt_ids,
                                    model_parallel)
        if len(cap) > MAX_COMPOSED:
            raise AdmissionError(f"{CAPABILITY_ARG} composes {len(cap)} modes; at most {MAX_COMPOSED}", CAPABILITY_ARG)
        digests = {}
        for name in cap:
            try:
                digests[name] = self.digest(name, model)
            except (KeyError, ValueError) as e:  # unknown, invalid name, or an invalid pack (PackError)
                known = ", ".join(self.store.names()) or "(none)"
                why = "unknown capability" if isinstance(e, KeyError) else f"capability cannot be served ({e}):"
                raise AdmissionError(f"{why} {name!r}; available: {known}", CAPABILITY_ARG, name) from None
        with self._lock:
            for name in cap:
                ids = self._admitted.setdefault(name, {})
                ids[request_id] = None
                if len(ids) > MAX_TRACKED:
                    del ids[next(iter(ids))]
        extra_args = {**extra_args, DIGESTS_ARG: digests}
        if strength == 0:
            return extra_args, client_salt  # the plain model: share its prefix cache
        h = hashlib.sha256(json.dumps([client_salt, strength, sorted(digests.items())]).encode())
        return extra_args, f"spd-{h.hexdigest()[:32]}"

    def _admit_auto(self, extra_args: dict, cap: Capability, strength: float, client_salt: str | None,
                    model: ModelInfo, request_id: str, prompt_ids: list[int] | None,
                    model_parallel: int) -> tuple[dict, str | None]:
        """`capability: "auto"`: every valid pack of the served model is a candidate (their digests
        recorded, as for named modes). The salt, which is also the worker's decision key, covers the
        prompt's tokens: the decision is a function of them, so equal prompts share prefix-cache
        blocks and a prompt never reads blocks written under another prompt's decision."""
        if len(cap) > 1:
            raise AdmissionError(f"{CAPABILITY_ARG} auto chooses one mode itself; it cannot be composed",
                                 CAPABILITY_ARG, AUTO_MODE)
        if model_parallel > 1:  # each rank (stage) would measure its own heads (layers) and could choose otherwise
            raise AdmissionError(f"{CAPABILITY_ARG} auto is not supported under tensor or pipeline parallelism",
                                 CAPABILITY_ARG, AUTO_MODE)
        digests = self.servable(model)
        if not digests:
            raise AdmissionError(f"{CAPABILITY_ARG} auto: the store holds no mode for this model", CAPABILITY_ARG,
                                 AUTO_MODE)
        if len(digests) > MAX_AUTO_CANDIDATES:
            raise AdmissionError(f"{CAPABILITY_ARG} auto chooses among at most {MAX_AUTO_CANDIDATES} modes; the "
                                 f"store holds {len(digests)}", CAPABILITY_ARG, AUTO_MODE)
        if strength == 0:
            return extra_args, client_salt
        h = hashlib.sha256(json.dumps([AUTO_MODE, client_salt, strength, sorted(digests.items())]).encode())
        h.update(array("q", prompt_ids).tobytes() if prompt_ids is not None else request_id.encode())
        key = f"spd-{h.hexdigest()[:32]}"
        return {**extra_args, DIGESTS_ARG: digests, AUTO_KEY_ARG: key}, key
