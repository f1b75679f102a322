"""The vLLM plugin: per-request K/V projection at the KV-cache write, inside stock vLLM.

Registered as the `vllm.general_plugins` entry point `spd_kv_projection`, so vLLM calls
`register()` in every process it starts (API server, engine core, each worker). `register()`,
once per process (idempotent):

- wraps the V1 model runner's `_model_forward` (the hook vLLM documents for subclasses to run the
  model), so each step's route is built once, before its forward, into persistent buffers;
- patches the KV-cache write of the attention backends the model actually uses, when the worker
  has chosen them (`initialize_attn_backend`, before any request), through vLLM's backend
  interface rather than per backend. vLLM 0.32 writes the cache in a separate custom op,
  `unified_kv_cache_update` (model_executor/layers/attention/attention.py:724-746), which calls
  `attn_layer.impl.do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)` for every
  backend whose `forward_includes_kv_cache_update` is False (CPU, FlashAttention, FlashInfer,
  Triton, FlexAttention, ROCm, ...). That call receives K after rotary, so it is exactly the
  project's site. Each impl class in use is patched where `do_kv_cache_update` is defined
  (subclasses inherit it). Once per step, before the forward, the tokens of the flattened batch
  are mapped to their requests (`input_batch.req_ids` and `query_start_loc`), each request to a
  slot of the worker's `ProjectionBank` (from its `SamplingParams.extra_args`), and the per-token
  slot and strength are written in place into the worker's `RouteBuffers`; every layer's KV write
  then projects all tokens in one batched call, reading that route. Dummy, profiling and capture
  runs do not go through `_model_forward` and project nothing; neither does a speculative
  drafter's forward (its own model, after the target's).
  The plugin imports nothing that vLLM would not import itself: model-runner patches are applied
  when vLLM imports the runner's module (an import hook), and no attention backend module is
  imported by the plugin. Importing a backend the platform does not use can load a second build
  of vLLM's kernels (GPU backends import `vllm._C`, the AVX-512 build, while an AVX2-only CPU runs
  `vllm._C_AVX2`), which aborts the process;
- checks, at that point, every decoder self-attention layer of the loaded model: a layer whose
  backend writes K/V inside `forward` (`forward_includes_kv_cache_update = True`, e.g.
  HPC_ATTN), an MLA layer, or an impl whose KV write does not have the standard signature makes
  the engine refuse to start with a RuntimeError naming the backend. Refusing at start-up is
  deliberate: the projection cannot happen there, a request naming a mode must never be served
  silently unprojected, and failing one request from inside a worker is impossible without
  killing the engine and every request in flight. The error says how to proceed: pick a
  supported backend (`--attention-backend FLASH_ATTN`, `TRITON_ATTN`, `FLASHINFER`, ...) or
  run vLLM without this plugin (`VLLM_PLUGINS` set to a list that leaves out
  `spd_kv_projection`);
- admits requests in the front end (`InputProcessor.process_inputs`, in the process that
  receives requests: the API server, or the `LLM` process): see `spd_engine.admission`.

With no mode in a step (or no mode loaded) nothing is computed and vLLM's own write runs as is.

Devices: per step the slot and strength of every token are built on the host (one entry per
request, expanded with `repeat_interleave`) and copied once into the worker's route buffers on the
runner's device; the token counts come from the runner's host copy of `query_start_loc`, so
routing never waits on the device. The
bank's bases are copied to the device (and cast to the KV dtype) once per bank, and reused by
every layer and step until the bank changes (a mode added, removed or composed).

CUDA graphs (GPU; none of this can be exercised on the CPU build, where vLLM never captures
graphs: `cudagraph_mode` is NONE). In the grouped route the projection inside the custom op
`unified_kv_cache_update` decides in Python what to run (which layers, which slots: grouped,
host-side shapes) over a bank rebuilt when modes change. A captured CUDA graph replays kernels
only, so a graph that contains that op would freeze the capture's projection (a dummy batch, no
modes): every later request served unprojected.

The captured route (`CaptureConfig`) is the form a captured graph can replay: at every decoder
layer the op runs `project_routed` over persistent tensors only, the route (`RouteBuffers`) and the
step's capabilities' bases (`spd_engine.bank.CapturedBank`, at most `SPD_CAPTURED_SLOTS` distinct
capabilities and `SPD_CAPTURED_RANK` columns per site), both written in place before the forward.
With it every CUDA-graph mode is kept. A step whose capabilities do not fit, or that still has
`auto` modes to choose, runs eagerly through the grouped route (the forward context's runtime mode
set to NONE, which vLLM's graph wrappers run without graphs). It is chosen when the runner starts,
exactly where the configured mode would otherwise be lowered (below): so on CUDA by default
(FULL_AND_PIECEWISE), never on the CPU (NONE); `SPD_CAPTURED_ROUTE=1` forces it, `=0` forces the
grouped route and the lowering. On the CPU engine it gives the grouped route's tokens
(tests/test_vllm_backend.py); it has not run on a GPU (none here). For the grouped route:

- FULL, FULL_DECODE_ONLY, and the FULL half of FULL_AND_PIECEWISE (vLLM's default on CUDA:
  optimization levels O2 (default) and O3, config/vllm.py:303,324) capture the whole forward,
  the KV write included (v1/worker/gpu_model_runner.py:5210-5216 wraps the model in
  `CUDAGraphWrapper(runtime_mode=FULL)`): not supported.
- PIECEWISE is supported when `vllm::unified_kv_cache_update` is a splitting op: the graph is
  split at it and it runs eagerly between the captured pieces, every step. That is vLLM's
  default under VLLM_COMPILE with `splitting_ops` unset and no Inductor graph partition:
  `set_splitting_ops_for_v1` appends it (config/compilation.py:1168-1206, vLLM issue 33267).
  With explicit `splitting_ops`, or with `use_inductor_graph_partition=True` (splitting ops
  become Inductor partition rules; the KV update is not added by default), it must be listed
  explicitly.
- NONE (and `--enforce-eager`) is always supported.
- `VLLM_USE_BREAKABLE_CUDAGRAPH=1` captures the whole forward and breaks only at ops marked
  `eager_break_during_capture` (compilation/breakable_cudagraph.py); `unified_attention_with_output`
  is one (attention.py:765), `unified_kv_cache_update` (attention.py:724) is not: not supported.
The worker enforces this before it loads the model (the FULL wrapper is applied in
`load_model`): with the grouped route (`SPD_CAPTURED_ROUTE=0`) a mode that is not supported is
lowered, with a WARNING, to PIECEWISE when the KV update is a splitting op under VLLM_COMPILE,
else to NONE (decode batches lose the full-graph speed-up). The
ROCm fusions that move the KV write into another op (`fuse_rope_kvcache`,
`fuse_qk_norm_rope_kvcache`: they call `do_rope_and_kv_cache_update` or
`do_qk_norm_rope_kvcache_update`, not `do_kv_cache_update`) are switched off the same way. After
the backends are set up the resolved mode is checked again and a FULL mode without the captured
route is a RuntimeError.
Not exercised on a GPU yet (none here): the tests cover the policy on configs, not a capture.

Model runner: the routing reads the V1 runner (`input_batch`, `requests`). vLLM 0.32 uses the V2
runner on CUDA when Triton is present (config/vllm.py:703-739), so on GPU `register()` sets
`VLLM_USE_V2_MODEL_RUNNER=0` unless the user set it; a V2 runner (set explicitly) refuses to
start with a RuntimeError. The CPU build always uses V1 (no Triton CPU backend).

Requests select modes with `extra_args` (OpenAI: `vllm_xargs`):
    {"capability": "math" | ["math", "code"], "capability_strength": 0.0 .. 1.0 (default 1)}

Packs are read from the store directory `SPD_STORE_DIR` (default: the repository's `subspaces/`).
The front end admits a request only if every mode it names is a valid pack for the served model
there (else an HTTP 400 naming the field, before scheduling), and records each pack's digest in
the request; a worker loads a pack the first time a request names it (or names other bases under
the same name) and projects with exactly the admitted bases. So a mode is added by saving a pack
into the store and removed by deleting it, in a running server, with no RPC. A worker keeps at
most 64 modes and 32 compositions loaded, least recently used evicted first.

Tensor parallelism: each rank builds its bank over its own KV heads (`heads=`), so head-granularity
packs project the heads the rank holds; layer-granularity packs are refused with a PackError.
"""
from __future__ import annotations

import importlib.abc
import logging
import os
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

import torch

from spd_engine.admission import Admission, AdmissionError
from spd_engine.auto import AUTO_MODE, AutoConfig, Decision, Decisions, choose, report, site_energy
from spd_engine.bank import CapturedBank, ModeCache, ProjectionBank
from spd_engine.models import info
from spd_engine.paths import store_dir
from spd_engine.projection import NO_MODE, RouteBuffers, SiteBank
from spd_engine.subspace import Site, Store
from spd_engine.vllm_requests import AUTO_KEY_ARG, DIGESTS_ARG, parse_extra_args

from . import vllm_lora_fixes as lora_fixes
from .settings import CaptureConfig

log = logging.getLogger("spd.vllm_plugin")


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class _Step(threading.local):
    route: "Route | None" = None  # this step's, built before the forward (`_wrap_model_forward`)
    in_update: bool = False  # inside a patched KV write: a nested patched write must not project again


class PluginState:
    """Everything the plugin keeps in one process: whether it is registered, the patched impls,
    the worker's mode cache, the current step (per thread), the front end's admission. Only this
    module changes it; `use_modes` is the one way in from outside (a benchmark measuring two mode
    sets of one engine)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.registered = False
        self.patched: dict[str, type] = {}  # impl class name -> the class whose do_kv_cache_update carries the patch
        self.modes: ModeCache | None = None
        self.step = _Step()
        self._admission: Admission | None = None
        self.installed: set[str] = set()  # the HOOKS installed in this process (Hook.name)
        self.fixes: list[str] = []  # the vLLM bugs found by their probes and fixed in this process (vllm_lora_fixes)
        self.decisions = Decisions()  # the worker's capability-auto decisions
        self.auto_config = AutoConfig.from_env()
        self.route_buffers: RouteBuffers | None = None  # the worker's per-token route, written in place each step
        self.capture_config = CaptureConfig()  # the worker's, read when its runner is created
        self.captured: CapturedBank | None = None  # the worker's bank as a captured graph reads it (captured route)
        self.steps = {"captured": 0, "eager": 0}  # captured route: steps served from the buffers / run eagerly

    @property
    def admission(self) -> Admission:
        """The front end's admission over the store `SPD_STORE_DIR` names (read when first needed)."""
        with self.lock:
            root = store_dir()
            if self._admission is None or self._admission.store.root != root:
                self._admission = Admission(Store(root, clean=False))
            return self._admission

    def worker_modes(self, runner) -> ModeCache:
        """This worker's mode cache, created on first use from the runner's model and TP rank."""
        with self.lock:
            if self.modes is None:
                from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

                cfg = runner.vllm_config.model_config
                heads = kv_heads_of_rank(cfg.get_total_num_kv_heads(), get_tensor_model_parallel_rank(),
                                         get_tensor_model_parallel_world_size())
                self.modes = ModeCache(info(Path(cfg.model)), heads, store_dir())
            return self.modes

    def buffers(self, tokens: int, device: torch.device) -> RouteBuffers:
        """The worker's persistent route buffers (at least `tokens` rows, on `device`): allocated
        once, so every step's route lives in the same tensors, as a captured graph needs."""
        # normal tensors even when first needed inside the forward (inference mode): an inference
        # tensor could not be written outside it later
        with self.lock, torch.inference_mode(False):
            b = self.route_buffers
            if b is None or b.slot.shape[0] < tokens or b.slot.device != device:
                self.route_buffers = b = RouteBuffers(tokens, device)
            return b

    def start_capture(self, runner) -> None:
        """Allocate the captured route's buffers for `runner`'s model, before any graph is captured."""
        with self.lock, torch.inference_mode(False):
            cfg, modes = self.capture_config, self.worker_modes(runner)
            heads = modes.bank.heads
            width = len(heads) * modes.model.head_dim if heads else modes.model.kv_width
            self.captured = CapturedBank(modes.model.n_layers, width, cfg.max_slots, cfg.max_rank, runner.device,
                                         runner.dtype)
            self.buffers(runner.max_num_tokens, runner.device)

    def use_modes(self, modes: ModeCache | None) -> ModeCache | None:
        """Swap this worker's mode cache (None: a new one at the next step); returns the previous."""
        with self.lock:
            previous, self.modes = self.modes, modes
            return previous


def kv_heads_of_rank(total_kv_heads: int, tp_rank: int, tp_size: int) -> list[int] | None:
    """The global KV heads a tensor-parallel rank holds (None: all of them), as vLLM shards
    `QKVParallelLinear`: heads are split over ranks, or replicated when ranks outnumber them."""
    if tp_size == 1:
        return None
    local = max(1, total_kv_heads // tp_size)
    replicas = max(1, tp_size // total_kv_heads)
    start = (tp_rank // replicas) * local
    return list(range(start, start + local))


# ------------------------------------------------------------------ per-step routing

@dataclass(frozen=True)
class Pending:
    """A `capability: "auto"` request of this step whose mode is not chosen yet: its rows, its
    strength, its candidate modes and its decision key (see spd_engine.auto)."""

    request_id: str
    rows: tuple[int, int]
    strength: float
    candidates: tuple[str, ...]
    key: str | None


@dataclass(frozen=True)
class Route:
    """One step's projection: the bank, its site banks on the device of K, and per token its slot
    and strength (views of the worker's `RouteBuffers`, on that device too). `pending` auto
    requests are chosen at layer `decide_at`."""

    bank: ProjectionBank
    sites: dict[Site, SiteBank]
    slot: torch.Tensor  # (tokens,) long, NO_MODE for tokens without a mode
    strength: torch.Tensor  # (tokens,)
    layers: frozenset[int]
    pending: tuple[Pending, ...] = ()
    decide_at: int = -1
    captured: bool = False  # slots index the captured bank's buffers (the captured route), not `sites`


def _step_metadata():
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    md = get_forward_context().attn_metadata
    if isinstance(md, list):  # speculative decoding: [0] is the target model's (as get_attention_context)
        md = md[0] if md else None
    if isinstance(md, dict):  # one entry per layer, all of one step's tokens
        md = next(iter(md.values()), None)
    return md


def _route(runner, n_tokens: int) -> Route | None:
    """The step's route, built once before its forward (the runner's request order is final by
    then) and read by every layer's KV write: per token its slot and strength, written into the
    worker's persistent buffers."""
    md = _step_metadata()
    if md is None or not hasattr(md, "query_start_loc"):
        return None  # warm-up without attention metadata (or micro-batching, not supported)
    req_ids = runner.input_batch.req_ids
    decisions = PLUGIN.decisions
    caps, strengths, digests, auto = [], [], {}, []
    for i, rid in enumerate(req_ids):  # one entry per request, never per token
        sp = runner.requests[rid].sampling_params
        args = sp.extra_args if sp is not None else None
        try:
            cap, strength = parse_extra_args(args)
        except ValueError:
            cap, strength = (), 0.0  # the front end validates; never fail the whole batch here
        if cap and strength > 0:
            digests.update(args.get(DIGESTS_ARG) or {})
            if cap == (AUTO_MODE,):
                seen = rid in decisions.by_request
                decision = decisions.get(rid, args.get(AUTO_KEY_ARG))
                if decision is None:  # its first prefill chunk: chosen at the decision layer
                    auto.append((i, rid, args))
                elif not seen:  # an equal prompt's decision (its K/V may come from the prefix cache)
                    _report(rid, decision)
                cap = decision.capability if decision is not None else ()
        caps.append(cap if strength > 0 else ())
        strengths.append(strength)
    if auto and len(decisions.by_request) > 4 * len(runner.requests) + 64:
        decisions.keep_only(set(runner.requests))
    if not any(caps) and not auto:
        return None
    candidates = sorted({n for _, _, args in auto for n in args.get(DIGESTS_ARG) or {}})
    modes = PLUGIN.worker_modes(runner)
    bank, served = modes.bank_for(caps + [(n,) for n in candidates], digests)
    caps = served[: len(req_ids)]
    candidates = [n for n in candidates if n in bank.modes]
    if not any(caps) and not candidates:
        return None
    qsl = runner.query_start_loc.cpu[: len(req_ids) + 1].to(torch.long)  # the host twin: no device sync
    counts = qsl[1:] - qsl[:-1]
    pending = tuple(Pending(rid, (int(qsl[i]), int(qsl[i + 1])), strengths[i],
                            tuple(n for n in args.get(DIGESTS_ARG) or {} if n in bank.modes), args.get(AUTO_KEY_ARG))
                    for i, rid, args in auto)
    decide_at = min((layer for n in candidates for layer, _ in bank.modes[n].bases), default=-1)
    slots = None
    if PLUGIN.captured is not None and not pending:
        slots = PLUGIN.captured.load(bank, [c for c in caps if c])
    slot_of = (lambda c: slots[c] if c else NO_MODE) if slots is not None else bank.slot
    buffers = PLUGIN.buffers(max(n_tokens, runner.max_num_tokens), runner.device)
    buffers.write(torch.tensor([slot_of(c) for c in caps]).repeat_interleave(counts),  # the rest: padding, no mode
                  torch.tensor(strengths, dtype=torch.float32).repeat_interleave(counts))
    return Route(bank, modes.on_device(bank, runner.device, runner.dtype), buffers.slot[:n_tokens],
                 buffers.strength[:n_tokens], frozenset(layer for layer, _ in bank.sites), pending, decide_at,
                 captured=slots is not None)


def _report(request_id: str, decision: Decision) -> None:
    try:
        report(store_dir(), request_id, decision)
    except (OSError, ValueError) as e:  # the response then says no mode was reported; the projection stands
        log.warning("spd_kv_projection: cannot report the auto decision of %.80s (%s)", request_id, e)


def _decide(route: Route, layer: int, key: torch.Tensor, value: torch.Tensor) -> Route:
    """Choose the mode of each pending auto request from its own rows of K and V at `layer`
    (spd_engine.auto), before that layer is projected; the step's later layers use the new route."""
    cfg = PLUGIN.auto_config
    kinds = [(route.sites.get((layer, kind)), x) for kind, x in (("k", key), ("v", value)) if kind in cfg.kinds]
    slot, strength = route.slot, route.strength  # the step's buffers, written in place
    for p in route.pending:
        lo, hi = p.rows
        captured = total = 0.0
        for sb, x in kinds:
            if sb is None or hi <= lo:
                continue
            e, t = site_energy(x[lo:hi], sb, cfg.centered)
            covers = sb.covers.to(e.device, torch.float32)
            captured, total = captured + e, total + covers * t
        shares = {}
        if not isinstance(captured, float):
            ratio = (captured / total.clamp(min=1e-30)).tolist()
            shares = {n: round(ratio[route.bank.slot((n,))], 6) for n in p.candidates}
        decision = Decision(choose(shares, cfg), shares, layer)
        PLUGIN.decisions.put(p.request_id, p.key, decision)
        _report(p.request_id, decision)
        if decision.capability:
            slot[lo:hi] = route.bank.slot(decision.capability)
            strength[lo:hi] = p.strength
    PLUGIN.step.route = replace(route, pending=())
    return PLUGIN.step.route


def layer_index(layer_name: str) -> int | None:
    m = _LAYER.search(layer_name)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------ the patches

def _wrap_model_forward(orig):
    """The runner's forward of a step (`_model_forward`, inside its forward context, the batch laid
    out; dummy, profile and capture runs call the model directly and get no route)."""
    def _model_forward(self, *args, **kwargs):
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        PLUGIN.step.route = route = _route(self, positions.shape[-1]) if positions is not None else None
        if PLUGIN.captured is not None:
            if route is None:  # no mode this step: the captured graph reads the buffers all the same
                PLUGIN.route_buffers.write(torch.empty(0, dtype=torch.long), torch.empty(0))
            elif not route.captured:
                _run_eagerly()
            PLUGIN.steps["captured" if route is None or route.captured else "eager"] += 1
        try:
            return orig(self, *args, **kwargs)
        finally:
            PLUGIN.step.route = None

    _model_forward.__spd_patched__ = True
    return _model_forward


def _run_eagerly() -> None:
    """This step without CUDA graphs (its route is not in the captured bank): vLLM's graph
    wrappers run the model eagerly when the forward context's runtime mode is NONE."""
    from vllm.config import CUDAGraphMode
    from vllm.forward_context import get_forward_context

    get_forward_context().cudagraph_runtime_mode = CUDAGraphMode.NONE


def _wrap_kv_cache_update(orig):
    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        if PLUGIN.step.in_update:  # a subclass's write calling its patched parent's: project once
            return orig(self, layer, key, value, kv_cache, slot_mapping)
        decoder = getattr(layer, "attn_type", "decoder") == "decoder"
        route = PLUGIN.step.route if decoder else None
        if decoder and PLUGIN.captured is not None and (route is None or route.captured):
            # every step, capture included: tensors only, the route and bank read from the buffers
            key, value = PLUGIN.captured.apply(layer_index(layer.layer_name), key, value, PLUGIN.route_buffers)
        elif route is not None:
            idx = layer_index(layer.layer_name)
            if route.pending and idx == route.decide_at:
                route = _decide(route, idx, key, value)
            if idx in route.layers:
                k_bank, v_bank = route.sites.get((idx, "k")), route.sites.get((idx, "v"))
                if k_bank is not None:
                    key = k_bank.apply(key, route.slot, route.strength)
                if v_bank is not None:
                    value = v_bank.apply(value, route.slot, route.strength)
        PLUGIN.step.in_update = True
        try:
            return orig(self, layer, key, value, kv_cache, slot_mapping)
        finally:
            PLUGIN.step.in_update = False

    do_kv_cache_update.__spd_patched__ = True
    do_kv_cache_update.__wrapped__ = orig
    return do_kv_cache_update


_STANDARD_UPDATE = ("self", "layer", "key", "value", "kv_cache", "slot_mapping")


def _update_owner(impl: type) -> type | None:
    """The class in `impl`'s MRO that defines the do_kv_cache_update `impl` uses."""
    return next((c for c in impl.__mro__ if "do_kv_cache_update" in c.__dict__), None)


def _has_standard_signature(fn) -> bool:
    import inspect

    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    names = tuple(p.name for p in params[: len(_STANDARD_UPDATE)])
    return names == _STANDARD_UPDATE and all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                                             for p in params[len(_STANDARD_UPDATE):])


def patch_impl(impl: type) -> bool:
    """Patch the KV write `impl` uses, where it is defined (idempotent). False if `impl` has no
    `do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping)` (e.g. MLA impls)."""
    from vllm.v1.attention.backend import MLAAttentionImpl

    if issubclass(impl, MLAAttentionImpl):
        return False
    owner = _update_owner(impl)
    if owner is None:
        return False
    fn = owner.__dict__["do_kv_cache_update"]
    if not getattr(fn, "__spd_patched__", False):
        if not _has_standard_signature(fn):
            return False
        owner.do_kv_cache_update = _wrap_kv_cache_update(fn)
    PLUGIN.patched[impl.__name__] = owner
    return True


def check_model_layers(vllm_config) -> list[str]:
    """Make sure every decoder self-attention layer of the loaded model writes K/V through a
    patched `do_kv_cache_update` (patching impls not patched yet); RuntimeError naming the
    backends where that is impossible. Returns the impl classes in use."""
    from vllm.model_executor.layers.attention.attention import Attention

    refused: dict[str, str] = {}
    used: set[str] = set()
    for name, layer in vllm_config.compilation_config.static_forward_context.items():
        if type(layer).__name__ == "MLAAttention":
            backend = getattr(layer, "attn_backend", None)
            refused[getattr(backend, "__name__", "MLA")] = "MLA attention caches a latent, not per-head K/V"
            continue
        if not isinstance(layer, Attention) or getattr(layer, "attn_type", "decoder") != "decoder":
            continue  # encoder / cross attention, linear attention, mamba, ...: no projection site
        if getattr(layer, "kv_sharing_target_layer_name", None) is not None:
            continue  # reads another layer's (projected) cache, writes none
        backend = layer.attn_backend
        if backend.forward_includes_kv_cache_update:
            refused[backend.__name__] = "it writes the KV cache inside forward, where K/V cannot be projected"
            continue
        for impl in layer.impl.get_impl_variants():
            if patch_impl(type(impl)):
                used.add(type(impl).__name__)
            else:
                refused[backend.__name__] = f"{type(impl).__name__} has no standard do_kv_cache_update"
    if refused:
        raise RuntimeError(
            "spd_kv_projection cannot project K/V with "
            + "; ".join(f"attention backend {b} ({why})" for b, why in sorted(refused.items()))
            + ". Choose a backend with a separate KV-cache write (e.g. --attention-backend FLASH_ATTN, "
              "TRITON_ATTN or FLASHINFER), or run vLLM without this plugin (VLLM_PLUGINS set to a list "
              "that leaves out spd_kv_projection).")
    return sorted(used)


# ------------------------------------------------------------------ front end (the process that admits requests)

def _wrap_process_inputs(orig):
    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        from vllm.exceptions import VLLMValidationError
        from vllm.sampling_params import SamplingParams

        request = orig(self, request_id, prompt, params, *args, **kwargs)
        sp = request.sampling_params
        if isinstance(sp, SamplingParams) and sp.extra_args:
            model = getattr(self, "_spd_model_info", None)
            if model is None:
                model = self._spd_model_info = info(Path(self.vllm_config.model_config.model))
            parallel = self.vllm_config.parallel_config
            try:
                sp.extra_args, request.cache_salt = PLUGIN.admission.admit(
                    sp.extra_args, request.cache_salt, model, request_id, request.prompt_token_ids,
                    parallel.tensor_parallel_size * parallel.pipeline_parallel_size)
            except AdmissionError as e:
                raise VLLMValidationError(str(e), parameter=e.parameter, value=e.value) from None
        return request

    process_inputs.__spd_patched__ = True
    return process_inputs


# ------------------------------------------------------------------ CUDA graphs

_KV_UPDATE_OP = "vllm::unified_kv_cache_update"


def supported_cudagraph_mode(compilation_config):
    """The CUDA-graph mode the grouped route works under, closest to the configured one: the KV
    write must run eagerly every step (see the module docstring)."""
    from vllm import envs
    from vllm.config import CUDAGraphMode, CompilationMode

    mode = compilation_config.cudagraph_mode
    if mode is None or mode == CUDAGraphMode.NONE:
        return mode
    piecewise_ok = (compilation_config.mode == CompilationMode.VLLM_COMPILE
                    and _KV_UPDATE_OP in (compilation_config.splitting_ops or [])
                    and not envs.VLLM_USE_BREAKABLE_CUDAGRAPH)
    return CUDAGraphMode.PIECEWISE if piecewise_ok else CUDAGraphMode.NONE


def enforce_cudagraph_policy(vllm_config, capture: CaptureConfig) -> CaptureConfig:
    """In this worker's config, before the model is loaded and captured: choose the route (the
    captured one where the configured CUDA-graph mode would otherwise be lowered, unless
    `SPD_CAPTURED_ROUTE` says), lower an unsupported mode for the grouped route, and switch off
    the fusions that bypass `do_kv_cache_update`. The capture settings with the route chosen."""
    cc = vllm_config.compilation_config
    mode = supported_cudagraph_mode(cc)
    if capture.enabled is None:
        capture = replace(capture, enabled=mode != cc.cudagraph_mode)
    if capture.enabled:
        log.info("spd_kv_projection: the captured route (cudagraph_mode %s kept)", cc.cudagraph_mode)
    elif mode != cc.cudagraph_mode:
        log.warning("spd_kv_projection: cudagraph_mode %s would freeze the per-request K/V routing inside a "
                    "captured graph; using %s (the KV-cache write runs eagerly every step; SPD_CAPTURED_ROUTE=0 "
                    "chose this)", cc.cudagraph_mode, mode)
        cc.cudagraph_mode = mode
    pc = cc.pass_config
    for flag in ("fuse_rope_kvcache", "fuse_qk_norm_rope_kvcache"):
        if getattr(pc, flag, False):
            log.warning("spd_kv_projection: disabling pass_config.%s (it moves the KV-cache write out of "
                        "do_kv_cache_update, where K/V are projected)", flag)
            setattr(pc, flag, False)
    return capture


def check_cudagraph_mode(vllm_config) -> None:
    mode = vllm_config.compilation_config.cudagraph_mode
    if mode is not None and mode.has_full_cudagraphs() and PLUGIN.captured is None:
        raise RuntimeError(f"spd_kv_projection: cudagraph_mode {mode} captures the KV-cache write in a full CUDA "
                           "graph, which freezes per-request routing; use PIECEWISE or NONE (--enforce-eager)")


# ------------------------------------------------------------------ worker start-up hooks

def _wrap_runner_init(orig):
    def __init__(self, vllm_config, *args, **kwargs):
        # a bad setting refuses to start the engine; before load_model wraps the model in a FULL graph
        PLUGIN.capture_config = enforce_cudagraph_policy(vllm_config, CaptureConfig.from_env())
        return orig(self, vllm_config, *args, **kwargs)

    __init__.__spd_patched__ = True
    return __init__


def _wrap_initialize_attn_backend(orig):
    def initialize_attn_backend(self, *args, **kwargs):
        out = orig(self, *args, **kwargs)
        check_installed(_V1_RUNNER)
        used = check_model_layers(self.vllm_config)
        if PLUGIN.capture_config.enabled:
            PLUGIN.start_capture(self)
        check_cudagraph_mode(self.vllm_config)
        log.info("spd_kv_projection: K/V projected in %s; cudagraph_mode %s", ", ".join(used) or "(no layer)",
                 self.vllm_config.compilation_config.cudagraph_mode)
        return out

    initialize_attn_backend.__spd_patched__ = True
    return initialize_attn_backend


def _refuse_v2_runner(orig):
    def __init__(self, *args, **kwargs):
        raise RuntimeError("spd_kv_projection routes requests through the V1 model runner; unset "
                           "VLLM_USE_V2_MODEL_RUNNER or set it to 0 (or run without this plugin)")

    __init__.__spd_patched__ = True
    return __init__


def _fix_cpu_lora(module) -> None:
    if lora_fixes.fix_no_adapter_rows(module):
        PLUGIN.fixes.append("no_adapter_rows_get_the_last_adapter")
        log.info("spd_kv_projection: fixed vLLM's LoRA index -1 (tokens without an adapter got the last one)")


def _refuse_v2_runners(module) -> None:
    for cls in vars(module).values():
        if isinstance(cls, type) and cls.__module__ == module.__name__ and cls.__name__.endswith("ModelRunner") \
                and "__init__" in cls.__dict__ and not getattr(cls.__init__, "__spd_patched__", False):
            cls.__init__ = _refuse_v2_runner(cls.__init__)


@dataclass(frozen=True)
class Hook:
    """A vLLM method the plugin wraps, when vLLM imports its module (the plugin imports none: a
    module the platform does not use may load foreign kernels). Every hook is required: without it
    the plugin cannot keep its promise (a request naming a mode served as asked, or refused), so a
    vLLM that lacks it makes the engine refuse to start, naming it (optional patches are
    MODULE_PATCHES)."""

    module: str
    cls: str
    method: str
    wrap: Callable
    args: tuple[str, ...] = ("self",)  # the leading parameters the wrapper passes on by name or position

    @property
    def name(self) -> str:
        return f"{self.module}.{self.cls}.{self.method}"


_V1_RUNNER = "vllm.v1.worker.gpu_model_runner"  # vllm/v1/worker/gpu_model_runner.py; the CPU runner subclasses it
HOOKS: tuple[Hook, ...] = (
    Hook(_V1_RUNNER, "GPUModelRunner", "__init__", _wrap_runner_init,  # CUDA-graph policy before load_model
         ("self", "vllm_config")),
    Hook(_V1_RUNNER, "GPUModelRunner", "_model_forward", _wrap_model_forward),  # the step's route, before its forward
    Hook(_V1_RUNNER, "GPUModelRunner", "initialize_attn_backend", _wrap_initialize_attn_backend),  # patch the KV writes
    Hook(_V1_RUNNER, "GPUModelRunner", "_get_prompt_logprobs_dict", lora_fixes.wrap_prompt_logprobs,
         ("self", "hidden_states", "num_scheduled_tokens")),
    Hook("vllm.v1.engine.input_processor", "InputProcessor", "process_inputs", _wrap_process_inputs,  # admission
         ("self", "request_id", "prompt", "params")),
)
# whole-module patches, optional: the V2 runners (refused: routing reads the V1 runner) and the CPU LoRA ops
MODULE_PATCHES: dict[str, Callable[[ModuleType], None]] = {
    "vllm.v1.worker.gpu.model_runner": _refuse_v2_runners,
    "vllm.v1.worker.cpu.model_runner": _refuse_v2_runners,
    lora_fixes.CPU_PUNICA: _fix_cpu_lora,
}

# Every private vLLM symbol the project relies on, where it lives (vLLM 0.32), and who uses it.
PRIVATE_SYMBOLS: tuple[tuple[str, str, str], ...] = (
    *((f"{h.cls}.{h.method}", h.module.replace(".", "/") + ".py", "wrapped (HOOKS)") for h in HOOKS),
    ("<attention impl>.do_kv_cache_update", "vllm/v1/attention/backends/*.py", "wrapped per impl in use (patch_impl)"),
    ("GPUModelRunner.input_batch.req_ids / .requests / .query_start_loc / .max_num_tokens / .device / .dtype",
     "vllm/v1/worker/gpu_model_runner.py", "read: per-step routing, the route and captured-route buffers"),
    ("ForwardContext.attn_metadata", "vllm/forward_context.py", "read: the step's query_start_loc"),
    ("ForwardContext.cudagraph_runtime_mode", "vllm/forward_context.py",
     "set to NONE: a captured-route step that does not fit runs eagerly"),
    ("CompilationConfig.cudagraph_mode / splitting_ops / pass_config", "vllm/config/compilation.py",
     "read and lowered: CUDA-graph policy"),
    ("bgmv_shrink / bgmv_expand / bgmv_expand_slice", "vllm/lora/ops/torch_ops/lora_ops.py",
     "replaced where the probe finds the index -1 bug (vllm_lora_fixes)"),
    ("PunicaWrapperBase._sampler_indices / indices_len / token_lora_indices", "vllm/lora/punica_wrapper/punica_base.py",
     "read and set: prompt logprobs under LoRA (vllm_lora_fixes)"),
    ("OpenAIServingModels.lora_id_counter / lora_requests", "vllm/entrypoints/openai/models/serving.py",
     "replaced / followed: adapters across API-server processes (server/state.py)"),
)


def _hooks_of(module: str) -> list[Hook]:
    return [h for h in HOOKS if h.module == module]


def _apply(module: ModuleType) -> None:
    """Install the hooks of a module vLLM just imported (RuntimeError naming a missing target)."""
    for hook in _hooks_of(module.__name__):
        cls = getattr(module, hook.cls, None)
        fn = getattr(cls, hook.method, None) if cls is not None else None
        if fn is None:
            raise RuntimeError(f"spd_kv_projection: this vLLM has no {hook.name}, which the plugin must hook; "
                               "refusing to start (see the README for the supported vLLM versions)")
        if not getattr(fn, "__spd_patched__", False):
            setattr(cls, hook.method, hook.wrap(fn))
        PLUGIN.installed.add(hook.name)
    patch = MODULE_PATCHES.get(module.__name__)
    if patch is not None:
        patch(module)


def check_required_modules() -> None:
    """Every required hook's module exists in this vLLM (its parent packages are imported, not it)."""
    import importlib.util

    for module in sorted({h.module for h in HOOKS}):
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:
            found = False
        if not found:
            names = ", ".join(h.name for h in _hooks_of(module))
            raise RuntimeError(f"spd_kv_projection: this vLLM has no module {module} (hooks: {names}); "
                               "refusing to start (see the README for the supported vLLM versions)")


def check_installed(module: str) -> None:
    """At engine start: every required hook of `module` reported that it is installed."""
    missing = [h.name for h in _hooks_of(module) if h.name not in PLUGIN.installed]
    if missing:
        raise RuntimeError(f"spd_kv_projection: hooks not installed: {', '.join(missing)}; refusing to start")


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Installs a module's hooks when it is first imported, by whoever imports it."""

    def __init__(self, modules: set[str]):
        self.modules = modules

    def find_spec(self, name, path, target=None):
        if name not in self.modules:
            return None
        for finder in sys.meta_path:  # the finders that really load it (never another of ours: endless recursion)
            if isinstance(finder, _PatchOnImport) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        _apply(module)


def die_with_parent() -> None:
    """In a process vLLM spawned (engine core, workers): be killed when the parent dies, so a
    server killed with SIGKILL leaves no engine behind holding memory (vLLM does not do this)."""
    import ctypes
    import multiprocessing
    import signal

    parent = multiprocessing.parent_process()
    if parent is None:
        return  # the process the user started (API server, LLM): its lifetime is the user's
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux
    if os.getppid() != parent.pid:  # the parent died before the prctl
        os.kill(os.getpid(), signal.SIGKILL)


def register() -> None:
    """vLLM's plugin hook: install the patches once per process (vLLM may call it again)."""
    with PLUGIN.lock:
        if PLUGIN.registered:
            return
        PLUGIN.registered = True
        die_with_parent()
        from vllm.platforms import current_platform

        if not current_platform.is_cpu() and "VLLM_USE_V2_MODEL_RUNNER" not in os.environ:
            os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # routing reads the V1 runner (inherited by workers)
            log.info("spd_kv_projection: VLLM_USE_V2_MODEL_RUNNER=0 (the projection needs the V1 model runner)")
        check_required_modules()
        modules = {h.module for h in HOOKS} | set(MODULE_PATCHES)
        for module in sorted(modules & set(sys.modules)):
            _apply(sys.modules[module])
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _PatchOnImport)]
        sys.meta_path.insert(0, _PatchOnImport(modules - set(sys.modules)))


FRONT_END_HOOK = next(h.name for h in HOOKS if h.wrap is _wrap_process_inputs)


def front_end() -> Admission | None:
    """This process's admission, if requests are admitted through the plugin here (validation,
    digests, cache salt); None if the front-end hook is not installed."""
    return PLUGIN.admission if FRONT_END_HOOK in PLUGIN.installed else None


def is_active() -> bool:
    """Whether this process's attention backends carry the projection patch."""
    return bool(PLUGIN.patched) and all(getattr(owner.__dict__["do_kv_cache_update"], "__spd_patched__", False)
                                        for owner in PLUGIN.patched.values())


PLUGIN = PluginState()  # this process's plugin state (vLLM loads the plugin once per process)
