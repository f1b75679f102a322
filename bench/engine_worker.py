"""One vLLM engine in its own process, driven by the benchmark parent over stdin/stdout.

    python bench/engine_worker.py '{"arm": "plugin"|"stock"|"offline", "engine": {...}}'

`plugin`: the library's VLLMBackend (spd_engine/vllm_backend.py: vLLM's `LLM` with the
spd_kv_projection plugin, which vLLM loads through its entry point). A mode is a pack saved into
the backend's store (`add_subspace`); the plugin's front end admits requests against that store,
records the pack digests and sets each request's per-mode cache salt; the worker loads a pack when
a request first names it. Packs here are random (`calibrate(..., method="random")`): the cost of a
projection does not depend on its basis. `stock`: vLLM's own `LLM` with the same engine settings,
started by the parent with `VLLM_PLUGINS=none` (vLLM then loads no plugin), and checked to hold no
trace of ours. Both run the engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, executor
`uni`: VLLMBackend's default) and are driven by the same loop (add_request + step), so the plugin
is the only difference. `offline`: vLLM's `LLM` with its default process model (the engine core in
a process of its own), no plugin, for `LLM.generate` against a server.

Protocol: one JSON command per stdin line; one reply per command on stdout, a line starting with
`@@bench ` (vLLM logs to stdout too, so every other line is noise for the parent).
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(1, str(Path(__file__).resolve().parent))

TAG = "@@bench "


def cpu_now() -> float:
    """CPU seconds of this worker's process group (this process and vLLM's processes it started)."""
    from common import group_cpu_seconds

    return group_cpu_seconds(os.getpgid(0))


def reply(obj) -> None:
    sys.stdout.write(TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()


class Worker:
    def __init__(self, arm: str, engine: dict):
        from spd_engine import models
        from spd_engine.data import load_examples, resolve_data

        self.arm = arm
        self.path = models.resolve("smollm2-135m")
        self.info = models.info(self.path)
        self.ids = 0
        self.stash: dict[str, object] = {}  # plugin arm: the worker's mode sets, by name (see use_worker_modes)
        self.current_modes = "default"
        t0 = time.perf_counter()
        if arm == "plugin":
            from spd_engine.vllm_backend import VLLMBackend

            settings = dict(engine)
            if settings.pop("dtype", "float32") != "float32":
                raise ValueError("VLLMBackend serves float32 only")
            self.be = VLLMBackend(str(self.path), max_loras=0, **settings)
            self.llm, self.tok = self.be.llm, self.be.tokenizer
        else:
            import torch
            from transformers import AutoTokenizer
            from vllm import LLM

            self.be = None
            self.tok = AutoTokenizer.from_pretrained(self.path)
            if arm == "stock":
                if "OMP_NUM_THREADS" not in os.environ:
                    torch.set_num_threads(1)  # as VLLMBackend does for the in-process worker
                self.llm = LLM(model=str(self.path), distributed_executor_backend="uni", tensor_parallel_size=1,
                               enable_lora=False, **engine)
            else:  # offline: vLLM's defaults for everything not given
                self.llm = LLM(model=str(self.path), **engine)
        self.start_seconds = time.perf_counter() - t0
        self.engine = self.llm.llm_engine
        self.gsm = load_examples(resolve_data("gsm8k"), "math")

    def plugin_state(self) -> dict:
        return {"arm": self.arm, "plugin_module_imported": "server.vllm_plugin" in sys.modules,
                "plugin_active": self._plugin_active(), "VLLM_PLUGINS": os.environ.get("VLLM_PLUGINS"),
                "VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING"),
                "store": str(self.be.store.root) if self.be else None, "start_seconds": self.start_seconds,
                "kv_width": self.info.kv_width, "n_layers": self.info.n_layers, "model_dir": str(self.path),
                "max_num_seqs": self.engine.vllm_config.scheduler_config.max_num_seqs,
                "max_num_batched_tokens": self.engine.vllm_config.scheduler_config.max_num_batched_tokens}

    @staticmethod
    def _plugin_active() -> bool:
        mod = sys.modules.get("server.vllm_plugin")
        return bool(mod and mod.is_active())

    # -------------------------------------------------------------- modes (plugin arm)

    def add_mode(self, name: str, rank: int, layers: list[int], kinds: list[str], seed: int = 0) -> dict:
        from spd_engine.calibrate import CalibrationConfig, calibrate

        pack = calibrate(None, self.tok, self.info, "math", [], name,
                         CalibrationConfig(rank=rank, layers=layers, kinds=tuple(kinds), method="random", seed=seed))
        t0 = time.perf_counter()
        self.be.add_subspace(pack)  # saved into the store the plugin serves
        return {"add_seconds": time.perf_counter() - t0}

    def add_modes(self, names: list[str], rank: int, layers: list[int], kinds: list[str]) -> dict:
        t0 = time.perf_counter()
        for i, n in enumerate(names):
            self.add_mode(n, rank, layers, kinds, seed=i)
        return {"seconds": time.perf_counter() - t0, "store_modes": len(self.be.capabilities())}

    def remove_mode(self, name: str) -> dict:
        self.be.remove_subspace(name)
        return {}

    def worker_modes(self) -> dict:
        """What the plugin's worker (in this process: executor `uni`) has loaded."""
        from server import vllm_plugin

        m = vllm_plugin.PLUGIN.modes
        if m is None:
            return {"loaded": 0, "slots": 0, "max_modes": None}
        return {"loaded": len(m.bank.modes), "slots": len(m.bank.slots), "max_modes": m.max_modes,
                "columns_per_site": {f"{layer}{kind}": int(sb.W.shape[1]) for (layer, kind), sb in m.bank.sites.items()}}

    def use_worker_modes(self, key: str) -> dict:
        """Switch the worker's loaded-mode set (`ModeCache`) to the one kept under `key` (a new,
        empty one the first time), keeping the current one under its own key: two states of one
        engine (e.g. 64 modes loaded vs one) measured alternately with the same model, KV cache
        and scheduler."""
        from server import vllm_plugin

        if self.arm != "plugin" or os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
            raise RuntimeError("use_worker_modes needs the plugin arm with its worker in this process")
        self.stash[self.current_modes] = vllm_plugin.PLUGIN.use_modes(self.stash.get(key))
        self.current_modes = key
        return self.worker_modes()

    # -------------------------------------------------------------- generation

    def prompts(self, offset: int, n: int, style: str = "chat") -> list[list[int]]:
        """`chat`: the math task's prompt through the chat template (as jobs build them; every
        prompt starts with the template's system prompt); `raw`: the bare GSM8K question, so
        prompts share no prefix block and the prefix cache cannot favour any arm."""
        from spd_engine.formatting import prompt_ids

        exs = [self.gsm[(offset + i) % len(self.gsm)] for i in range(n)]
        if style == "raw":
            return [self.tok(e.prompt).input_ids for e in exs]
        return [prompt_ids(self.tok, "math", e) for e in exs]

    def run(self, batch: int, max_tokens: int, caps: list[list[str]] | None = None, offset: int = 0,
            reset_cache: bool = True, style: str = "chat", strength: float = 1.0) -> dict:
        """`batch` requests of exactly `max_tokens` tokens (EOS ignored), caps[i] the mode(s) of
        request i (a list: one name, several = a composition, none = no mode); tokens/s of the
        whole batch, prefill included. The plugin's front end admits each request and salts its
        prefix cache per mode: nothing is passed here but the mode in extra_args."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from spd_engine.vllm_requests import extra_args_for

        caps = caps or [[] for _ in range(batch)]
        prompts = self.prompts(offset, batch, style)
        if reset_cache:
            self.engine.reset_prefix_cache()  # every arm prefills its prompts
        reqs = [(TokensPrompt(prompt_token_ids=ids),
                 SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                extra_args=extra_args_for(tuple(sorted(cap)), strength)))
                for ids, cap in zip(prompts, caps)]
        c0, t0 = cpu_now(), time.perf_counter()
        pending = set()
        for prompt, params in reqs:
            rid = f"b-{self.ids}"
            self.ids += 1
            pending.add(rid)
            self.engine.add_request(rid, prompt, params)
        tokens = 0
        while pending:
            for o in self.engine.step():
                if o.finished and o.request_id in pending:
                    pending.discard(o.request_id)
                    tokens += len(o.outputs[0].token_ids)
        dt = time.perf_counter() - t0
        cpu = cpu_now() - c0
        return {"seconds": dt, "tokens": tokens, "tok_s": tokens / dt, "cpu_seconds": cpu,
                "tok_per_cpu_s": tokens / max(cpu, 1e-9),
                "prompt_tokens": sum(len(p["prompt_token_ids"]) for p, _ in reqs)}

    def offline_generate(self, prompt_ids: list[list[int]], max_tokens: int, stop: list[str] | None,
                         temperature: float = 0.0) -> dict:
        """vLLM's own offline entry point, `LLM.generate`, on token-id prompts."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=stop or None)
        c0, t0 = cpu_now(), time.perf_counter()
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
        dt = time.perf_counter() - t0
        cpu = cpu_now() - c0
        n = [len(o.outputs[0].token_ids) for o in outs]
        return {"seconds": dt, "cpu_seconds": cpu, "tokens": sum(n), "n_tokens": n,
                "texts": [o.outputs[0].text for o in outs]}

    def close(self) -> None:
        if self.be is not None:
            self.be.close()
        else:
            self.engine.engine_core.shutdown()


def main() -> None:
    cfg = json.loads(sys.argv[1])
    if cfg["arm"] != "plugin" and os.environ.get("VLLM_PLUGINS") != "none":
        raise SystemExit("the stock and offline arms must run with VLLM_PLUGINS=none: no vLLM plugin loaded")
    w = Worker(cfg["arm"], cfg["engine"])
    state = w.plugin_state()
    if cfg["arm"] != "plugin" and (state["plugin_module_imported"] or state["plugin_active"]):
        raise SystemExit(f"the {cfg['arm']} arm has the plugin: {state}")
    if cfg["arm"] == "plugin" and not state["plugin_active"]:
        raise SystemExit(f"the plugin arm has no patched attention backend: {state}")
    reply({"ready": True, **state})
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        op = cmd.pop("op")
        if op == "quit":
            break
        try:
            reply({"ok": True, **getattr(w, op)(**cmd)})
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
            reply({"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})
    w.close()


if __name__ == "__main__":
    main()
