"""One vLLM engine in its own process, driven by bench/procs.py EngineClient: one JSON command per
stdin line, each reply a stdout line starting `@@bench ` (vLLM logs to stdout too).

    python bench/engine_worker.py '{"arm": "plugin"|"stock"|"offline", "engine": {...}}'

`plugin`: the library's VLLMBackend (vLLM's `LLM` with the plugin, through its entry point); a mode
is a random pack saved into its store (a projection's cost does not depend on its basis). `stock`:
vLLM's `LLM` with the same settings and `VLLM_PLUGINS=none`, checked to hold no trace of ours. Both
run the engine in this process (executor `uni`) through the same add_request + step loop, so the
plugin is the only difference. `offline`: `LLM` with its own process model, no plugin, for
`LLM.generate` against a server.
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

from common import MODEL, group_cpu_seconds, random_pack  # noqa: E402

TAG = "@@bench "


def cpu_now() -> float:
    """CPU seconds of this worker's process group (this process and the vLLM processes it started)."""
    return group_cpu_seconds(os.getpgid(0))


def engine_plugin():
    """The engine plugin's in-process state: the one place a benchmark reaches into the plugin."""
    from server import vllm_plugin

    return vllm_plugin.PLUGIN


class Worker:
    def __init__(self, arm: str, engine: dict):
        from spd_engine import models
        from spd_engine.data import load_examples, resolve_data

        self.arm, self.path = arm, models.resolve(MODEL)
        self.info = models.info(self.path)
        self.ids, self.be = 0, None
        self.stash: dict[str, object] = {}  # the worker's mode sets by key (use_worker_modes)
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

            self.tok = AutoTokenizer.from_pretrained(self.path)
            if arm == "stock":
                if "OMP_NUM_THREADS" not in os.environ:
                    torch.set_num_threads(1)  # as VLLMBackend does for the in-process worker
                engine = {**engine, "distributed_executor_backend": "uni", "tensor_parallel_size": 1,
                          "enable_lora": False}
            self.llm = LLM(model=str(self.path), **engine)  # offline: vLLM's defaults for the rest
        self.start_seconds = time.perf_counter() - t0
        self.engine = self.llm.llm_engine
        self.gsm = load_examples(resolve_data("gsm8k"), "math")

    def state(self) -> dict:
        sched = self.engine.vllm_config.scheduler_config
        mod = sys.modules.get("server.vllm_plugin")
        return {"arm": self.arm, "plugin_module_imported": mod is not None,
                "plugin_active": bool(mod and mod.is_active()), "VLLM_PLUGINS": os.environ.get("VLLM_PLUGINS"),
                "VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING"),
                "store": str(self.be.store.root) if self.be else None, "start_seconds": self.start_seconds,
                "kv_width": self.info.kv_width, "n_layers": self.info.n_layers, "model_dir": str(self.path),
                "max_num_seqs": sched.max_num_seqs, "max_num_batched_tokens": sched.max_num_batched_tokens}

    # -------------------------------------------------------------- modes (plugin arm)

    def add_modes(self, names: list[str], rank: int, layers: list[int], kinds: list[str]) -> dict:
        """Random packs (mode i seeded i) saved into the store the plugin serves."""
        t0, adding = time.perf_counter(), 0.0
        for i, name in enumerate(names):
            pack = random_pack(self.info, name, rank=rank, layers=layers, kinds=tuple(kinds), seed=i)
            t1 = time.perf_counter()
            self.be.add_subspace(pack)
            adding += time.perf_counter() - t1
        return {"seconds": time.perf_counter() - t0, "add_seconds": adding, "store_modes": len(self.be.capabilities())}

    def remove_modes(self, names: list[str]) -> dict:
        for name in names:
            self.be.remove_subspace(name)
        return {}

    def worker_modes(self) -> dict:
        """What the plugin's worker (in this process: executor `uni`) has loaded."""
        m = engine_plugin().modes
        if m is None:
            return {"loaded": 0, "slots": 0, "max_modes": None}
        return {"loaded": len(m.bank.modes), "slots": len(m.bank.slots), "max_modes": m.max_modes,
                "columns_per_site": {f"{layer}{kind}": int(sb.W.shape[1]) for (layer, kind), sb in m.bank.sites.items()}}

    def use_worker_modes(self, key: str) -> dict:
        """Swap the worker's loaded-mode set for the one kept under `key` (empty the first time),
        keeping the current one under its own key: two states of one engine (64 modes loaded vs
        one) measured alternately with the same model, KV cache and scheduler."""
        if self.arm != "plugin" or os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
            raise RuntimeError("use_worker_modes needs the plugin arm with its worker in this process")
        self.stash[self.current_modes] = engine_plugin().use_modes(self.stash.get(key))
        self.current_modes = key
        return self.worker_modes()

    # -------------------------------------------------------------- generation

    def run(self, batch: int, max_tokens: int, caps: list[list[str]] | None = None, style: str = "chat") -> dict:
        """`batch` requests of exactly `max_tokens` tokens (EOS ignored), request i in the mode(s)
        caps[i] (several: a composition); tokens/s of the whole batch, prefill included. Prompts:
        `chat`, the math task's through the chat template (a shared system prompt, as jobs build
        them); `raw`, the bare GSM8K question (no prefix block shared)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from spd_engine.formatting import prompt_ids
        from spd_engine.vllm_requests import extra_args_for

        caps = caps or [[] for _ in range(batch)]
        self.engine.reset_prefix_cache()  # every arm prefills its prompts
        exs = [self.gsm[i % len(self.gsm)] for i in range(batch)]
        ids = [self.tok(e.prompt).input_ids if style == "raw" else prompt_ids(self.tok, "math", e) for e in exs]
        reqs = [(TokensPrompt(prompt_token_ids=p), SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                                                  extra_args=extra_args_for(tuple(sorted(cap)), 1.0)))
                for p, cap in zip(ids, caps)]
        c0, t0 = cpu_now(), time.perf_counter()
        pending = set()
        for prompt, params in reqs:
            rid, self.ids = f"b-{self.ids}", self.ids + 1
            pending.add(rid)
            self.engine.add_request(rid, prompt, params)
        tokens = 0
        while pending:
            for o in self.engine.step():
                if o.finished and o.request_id in pending:
                    pending.discard(o.request_id)
                    tokens += len(o.outputs[0].token_ids)
        dt, cpu = time.perf_counter() - t0, cpu_now() - c0
        return {"seconds": dt, "tokens": tokens, "tok_s": tokens / dt, "cpu_seconds": cpu,
                "tok_per_cpu_s": tokens / max(cpu, 1e-9), "prompt_tokens": sum(map(len, ids))}

    def offline_generate(self, prompt_ids: list[list[int]], max_tokens: int, stop: list[str] | None) -> dict:
        """vLLM's own offline entry point, `LLM.generate`, greedy on token-id prompts."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop or None)
        c0, t0 = cpu_now(), time.perf_counter()
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
        dt, cpu = time.perf_counter() - t0, cpu_now() - c0
        n = [len(o.outputs[0].token_ids) for o in outs]
        return {"seconds": dt, "cpu_seconds": cpu, "tokens": sum(n), "n_tokens": n, "texts": [o.outputs[0].text for o in outs]}

    def close(self) -> None:
        if self.be is not None:
            self.be.close()
        else:
            self.engine.engine_core.shutdown()


def reply(obj) -> None:
    sys.stdout.write(TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    cfg = json.loads(sys.argv[1])
    if cfg["arm"] != "plugin" and os.environ.get("VLLM_PLUGINS") != "none":
        raise SystemExit("the stock and offline arms must run with VLLM_PLUGINS=none: no vLLM plugin loaded")
    w = Worker(cfg["arm"], cfg["engine"])
    state = w.state()
    if cfg["arm"] != "plugin" and (state["plugin_module_imported"] or state["plugin_active"]):
        raise SystemExit(f"the {cfg['arm']} arm has the plugin: {state}")
    if cfg["arm"] == "plugin" and not state["plugin_active"]:
        raise SystemExit(f"the plugin arm has no patched attention backend: {state}")
    reply({"ready": True, **state})
    for line in filter(str.strip, sys.stdin):
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
