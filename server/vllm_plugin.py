"""The vLLM plugin: per-request K/V projection at the KV-cache write, inside stock vLLM.

Registered as the `vllm.general_plugins` entry point `spd_kv_projection`, so vLLM calls
`register()` in every process it starts (API server, engine core, each worker). `register()`:

- wraps the model runner's `execute_model`, so the attention patch knows the runner of the step;
- patches `CPUAttentionBackendImpl.do_kv_cache_update`: on CPU the cache write is that separate
  op (not `forward`), and it receives K after rotary, so it is exactly the project's site. Once
  per step the tokens of the flattened batch are mapped to their requests (`input_batch.req_ids`
  and `query_start_loc`), each request to a slot of the worker's `ProjectionBank` (from its
  `SamplingParams.extra_args`), and every layer then projects all tokens in one batched call;
- adds worker methods `spd_add_mode` / `spd_remove_mode` / `spd_modes`, reached by name through
  `collective_rpc`, so they work when workers are separate processes.

With no mode in a step (or no mode loaded) nothing is computed and vLLM's own write runs as is.

Requests select modes with `extra_args` (OpenAI: `vllm_xargs`):
    {"capability": "math" | ["math", "code"], "capability_strength": 0.0 .. 1.0 (default 1)}

Stock OpenAI server: packs are read from the store directory `SPD_STORE_DIR` (default: the
repository's `subspaces/`); a worker loads a pack the first time a request names it. Start the
server with the validator so unknown names and bad strengths get an HTTP 400 before scheduling:

    SPD_STORE_DIR=/path/to/store python -m vllm.entrypoints.openai.api_server --model DIR \
        --dtype float32 --logits-processors server.vllm_plugin:CapabilityValidator

To add a mode without a restart, save it into the store; to remove one, delete it from the store
(the validator then rejects it) and, with VLLM_SERVER_DEV_MODE=1, `POST /collective_rpc
{"method": "spd_remove_mode", "args": [name]}` to unload it from the workers.

Tensor parallelism: each rank builds its bank over its own KV heads (`heads=`), so head-granularity
packs project the heads the rank holds; layer-granularity packs are refused with a PackError.
Only the CPU attention backend is patched in this build; on other platforms the plugin logs a
warning and changes nothing.
"""
from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spd_engine.bank import Capability, ProjectionBank, capability_key
from spd_engine.models import ModelInfo, info
from spd_engine.paths import store_dir
from spd_engine.projection import NO_MODE
from spd_engine.subspace import Store

log = logging.getLogger("spd.vllm_plugin")

CAPABILITY_ARG = "capability"
STRENGTH_ARG = "capability_strength"

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_registered = False
_register_lock = threading.Lock()


# ------------------------------------------------------------------ request arguments

def parse_extra_args(extra_args: dict[str, Any] | None) -> tuple[Capability, float]:
    """A request's (capability, strength) from its extra_args; ValueError if malformed."""
    args = extra_args or {}
    raw = args.get(CAPABILITY_ARG)
    if raw is not None and not (isinstance(raw, str) or (isinstance(raw, list) and all(isinstance(n, str) for n in raw))):
        raise ValueError(f"{CAPABILITY_ARG} must be a mode name or a list of names, got {raw!r}")
    strength = args.get(STRENGTH_ARG, 1.0)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"{STRENGTH_ARG} must be a number in [0, 1], got {strength!r}")
    return capability_key(raw), float(strength)


def extra_args_for(capability: Capability, strength: float) -> dict[str, Any] | None:
    """The extra_args selecting a mode (None for no mode), the inverse of parse_extra_args."""
    return {CAPABILITY_ARG: list(capability), STRENGTH_ARG: strength} if capability else None


# ------------------------------------------------------------------ worker-side modes

def kv_heads_of_rank(total_kv_heads: int, tp_rank: int, tp_size: int) -> list[int] | None:
    """The global KV heads a tensor-parallel rank holds (None: all of them), as vLLM shards
    `QKVParallelLinear`: heads are split over ranks, or replicated when ranks outnumber them."""
    if tp_size == 1:
        return None
    local = max(1, total_kv_heads // tp_size)
    replicas = max(1, tp_size // total_kv_heads)
    start = (tp_rank // replicas) * local
    return list(range(start, start + local))


class WorkerModes:
    """One worker's loaded modes. The bank is immutable and swapped by reference: a step keeps
    the bank it started with. A removed mode is retired, and leaves the bank only once no running
    request names it, so requests in flight finish in their mode."""

    def __init__(self, model: ModelInfo, heads: list[int] | None, root: Path):
        self.model, self.root = model, root
        self.bank = ProjectionBank(heads=heads)
        self.retired: set[str] = set()
        self._failed: set[str] = set()
        self._lock = threading.Lock()

    def add(self, name: str, root: Path | None = None) -> None:
        pack = Store(root or self.root).load(name, self.model)
        with self._lock:
            self.bank = self.bank.with_mode(pack)  # PackError here under TP with a layer pack
            self.retired.discard(name)
            self._failed.discard(name)

    def remove(self, name: str) -> None:
        with self._lock:
            if name not in self.bank.modes or name in self.retired:
                raise KeyError(f"no capability named {name!r} is loaded")
            self.retired.add(name)

    def names(self) -> list[str]:
        return sorted(set(self.bank.modes) - self.retired)

    def bank_for(self, caps: list[Capability]) -> tuple[ProjectionBank, list[Capability]]:
        """The bank for one step's capabilities (loading first-named packs from the store,
        dropping retired modes nobody uses, adding first-seen compositions), and the
        capabilities it can serve (a name that cannot be loaded runs without a mode)."""
        with self._lock:
            wanted = {n for c in caps for n in c}
            for name in sorted(wanted - set(self.bank.modes) - self.retired - self._failed):
                self._load_on_first_use(name)
            bank = self.bank
            for name in sorted(self.retired - wanted):
                bank = bank.without_mode(name)
                self.retired.discard(name)
            served = [c if all(n in bank.modes for n in c) else () for c in caps]
            for c in dict.fromkeys(served):
                bank = bank.with_capability(c)
            self.bank = bank
            return bank, served

    def _load_on_first_use(self, name: str) -> None:
        try:
            self.bank = self.bank.with_mode(Store(self.root).load(name, self.model))
        except (KeyError, ValueError) as e:  # PackError is a ValueError
            self._failed.add(name)  # log once; the front end's validation should have refused it
            log.error("capability %r cannot be loaded from %s (%s); its requests run without a mode", name, self.root, e)


_modes: WorkerModes | None = None
_modes_lock = threading.Lock()


def worker_modes(runner) -> WorkerModes:
    """This worker's modes, created on first use from the runner's model and TP rank."""
    global _modes
    with _modes_lock:
        if _modes is None:
            from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

            cfg = runner.vllm_config.model_config
            heads = kv_heads_of_rank(cfg.get_total_num_kv_heads(), get_tensor_model_parallel_rank(),
                                     get_tensor_model_parallel_world_size())
            _modes = WorkerModes(info(Path(cfg.model)), heads, store_dir())
        return _modes


# Worker methods, called by name through collective_rpc (self: the vLLM worker).

def spd_add_mode(self, name: str, root: str | None = None) -> list[str]:
    modes = worker_modes(self.model_runner)
    modes.add(name, Path(root) if root else None)
    return modes.names()


def spd_remove_mode(self, name: str) -> list[str]:
    modes = worker_modes(self.model_runner)
    modes.remove(name)
    return modes.names()


def spd_modes(self) -> list[str]:
    return worker_modes(self.model_runner).names()


# ------------------------------------------------------------------ per-step routing

@dataclass(frozen=True)
class Route:
    """One step's projection: the bank, and per token its slot and strength."""

    bank: ProjectionBank
    slot: torch.Tensor  # (tokens,) long, NO_MODE for tokens without a mode
    strength: torch.Tensor  # (tokens,)
    layers: frozenset[int]


class _Step(threading.local):
    runner: Any = None
    route: Route | None = None
    routed: bool = False


_step = _Step()


def _route(n_tokens: int, layer_name: str) -> Route | None:
    """The current step's route, built at the first KV write of the step (the runner's request
    order is final by then) and reused by every later layer."""
    if _step.routed:
        return _step.route
    from vllm.forward_context import get_forward_context, is_forward_context_available

    runner = _step.runner
    if runner is None or not is_forward_context_available():
        return None  # a dummy/profile run outside execute_model
    md = get_forward_context().attn_metadata
    if isinstance(md, dict):
        md = md.get(layer_name)
    if md is None or not hasattr(md, "query_start_loc"):
        return None  # warm-up without attention metadata (or micro-batching, not supported)
    _step.routed = True
    req_ids = runner.input_batch.req_ids
    caps, strengths = [], []
    for rid in req_ids:  # one entry per request, never per token
        sp = runner.requests[rid].sampling_params
        try:
            cap, strength = parse_extra_args(sp.extra_args if sp is not None else None)
        except ValueError:
            cap, strength = (), 0.0  # the front end validates; never fail the whole batch here
        caps.append(cap if strength > 0 else ())
        strengths.append(strength)
    if not any(caps):
        return None
    bank, caps = worker_modes(runner).bank_for(caps)
    if not any(caps):
        return None
    qsl = md.query_start_loc[: len(req_ids) + 1].to(torch.long)
    counts = qsl[1:] - qsl[:-1]
    slot = torch.full((n_tokens,), NO_MODE, dtype=torch.long)  # rows past the requests' tokens are padding
    strength = torch.zeros(n_tokens)
    real = int(qsl[-1])
    slot[:real] = torch.tensor([bank.slot(c) for c in caps]).repeat_interleave(counts)
    strength[:real] = torch.tensor(strengths).repeat_interleave(counts)
    _step.route = Route(bank, slot, strength, frozenset(layer for layer, _ in bank.sites))
    return _step.route


def layer_index(layer_name: str) -> int | None:
    m = _LAYER.search(layer_name)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------ the patches

def _wrap_execute_model(orig):
    def execute_model(self, scheduler_output, *args, **kwargs):
        _step.runner, _step.route, _step.routed = self, None, False
        try:
            return orig(self, scheduler_output, *args, **kwargs)
        finally:
            _step.runner, _step.route, _step.routed = None, None, False

    execute_model.__spd_patched__ = True
    return execute_model


def _wrap_kv_cache_update(orig):
    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        route = _route(key.shape[0], layer.layer_name)
        if route is not None:
            idx = layer_index(layer.layer_name)
            if idx in route.layers:
                key = route.bank.apply((idx, "k"), key, route.slot, route.strength)
                value = route.bank.apply((idx, "v"), value, route.slot, route.strength)
        return orig(self, layer, key, value, kv_cache, slot_mapping)

    do_kv_cache_update.__spd_patched__ = True
    return do_kv_cache_update


def register() -> None:
    """vLLM's plugin hook: install the patches once per process (vLLM may call it again)."""
    global _registered
    with _register_lock:
        if _registered:
            return
        _registered = True
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            log.warning("spd_kv_projection: only the CPU attention backend is patched in this build; "
                        "capability modes have no effect on %s", current_platform.device_name)
            return
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
        from vllm.v1.worker.worker_base import WorkerBase

        GPUModelRunner.execute_model = _wrap_execute_model(GPUModelRunner.execute_model)
        CPUAttentionBackendImpl.do_kv_cache_update = _wrap_kv_cache_update(CPUAttentionBackendImpl.do_kv_cache_update)
        WorkerBase.spd_add_mode = spd_add_mode
        WorkerBase.spd_remove_mode = spd_remove_mode
        WorkerBase.spd_modes = spd_modes


def is_active() -> bool:
    """Whether this process's CPU attention backend carries the projection patch."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    return getattr(CPUAttentionBackendImpl.do_kv_cache_update, "__spd_patched__", False)


# ------------------------------------------------------------------ request validation (process 0)

def _validator_base():
    from vllm.v1.sample.logits_processor import LogitsProcessor

    return LogitsProcessor


class CapabilityValidator(_validator_base()):
    """A logits processor that changes nothing: vLLM calls its `validate_params` for each request
    before scheduling, which turns an unknown mode or a bad strength into an HTTP 400."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        from vllm.exceptions import VLLMValidationError

        try:
            cap, _ = parse_extra_args(sampling_params.extra_args)
        except ValueError as e:
            raise VLLMValidationError(str(e), parameter="vllm_xargs") from None
        store = Store(store_dir())
        known = store.names()
        unknown = [n for n in cap if n not in known]
        if unknown:
            raise VLLMValidationError(
                f"unknown capability {', '.join(map(repr, unknown))}; available in {store.root}: "
                f"{', '.join(known) or '(none)'}", parameter=f"vllm_xargs.{CAPABILITY_ARG}", value=unknown[0])

    def __init__(self, vllm_config, device, is_pin_memory) -> None:
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits
