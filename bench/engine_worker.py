"""One vLLM engine in its own process, driven by the benchmark parent over stdin/stdout.

    python bench/engine_worker.py '{"arm": "plugin"|"stock", "engine": {...}}'

`plugin`: the project's VLLMBackend (the spd_kv_projection plugin registered; modes are random
packs made on request, the cost of a projection does not depend on its basis). `stock`: vLLM's
own `LLM` with the same engine settings, started by the parent with `VLLM_PLUGINS=` (an empty
list: vLLM's loader, vllm/plugins/__init__.py, loads only plugins named in it), and checked to
hold no trace of the plugin. Both arms drive the engine with the same loop (add_request + step,
as VLLMBackend.generate does), so the plugin is the only difference.

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

TAG = "@@bench "


def reply(obj) -> None:
    sys.stdout.write(TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()


class Worker:
    def __init__(self, arm: str, engine: dict, store: str):
        from spd_engine import models
        from spd_engine.data import load_examples, resolve_data

        self.arm = arm
        self.path = models.resolve("smollm2-135m")
        self.info = models.info(self.path)
        self.ids = 0
        t0 = time.perf_counter()
        if arm == "plugin":
            from server.vllm_backend import VLLMBackend

            settings = dict(engine)
            if settings.pop("dtype", "float32") != "float32":
                raise ValueError("VLLMBackend serves float32 only")
            self.be = VLLMBackend(str(self.path), store=store, max_loras=0, **settings)
            self.llm, self.tok = self.be.llm, self.be.tokenizer
        else:
            import torch
            from transformers import AutoTokenizer
            from vllm import LLM

            if "OMP_NUM_THREADS" not in os.environ:
                torch.set_num_threads(1)  # as VLLMBackend does for the in-process worker
            self.be = None
            self.tok = AutoTokenizer.from_pretrained(self.path)
            self.llm = LLM(model=str(self.path), distributed_executor_backend="uni", tensor_parallel_size=1,
                           enable_lora=False, **engine)
        self.start_seconds = time.perf_counter() - t0
        self.engine = self.llm.llm_engine
        self.gsm = load_examples(resolve_data("gsm8k"), "math")

    def plugin_state(self) -> dict:
        try:
            modes = self.engine.collective_rpc("spd_modes")
            loaded = True
        except (AttributeError, NotImplementedError):  # vLLM: "Method 'spd_modes' is not implemented"
            modes, loaded = None, False
        return {"arm": self.arm, "plugin_loaded": loaded, "plugin_module_imported": "server.vllm_plugin" in sys.modules,
                "VLLM_PLUGINS": os.environ.get("VLLM_PLUGINS"), "modes": modes, "start_seconds": self.start_seconds,
                "kv_width": self.info.kv_width, "n_layers": self.info.n_layers, "model_dir": str(self.path)}

    # -------------------------------------------------------------- modes (plugin arm)

    def add_mode(self, name: str, rank: int, layers: list[int], kinds: list[str], seed: int = 0) -> dict:
        from spd_engine.calibrate import CalibrationConfig, calibrate

        pack = calibrate(None, self.tok, self.info, "math", [], name,
                         CalibrationConfig(rank=rank, layers=layers, kinds=tuple(kinds), method="random", seed=seed))
        t0 = time.perf_counter()
        self.be.add_subspace(pack)
        return {"add_seconds": time.perf_counter() - t0}

    def remove_mode(self, name: str) -> dict:
        self.be.remove_subspace(name)
        return {}

    # -------------------------------------------------------------- generation

    def prompts(self, offset: int, n: int) -> list[list[int]]:
        from spd_engine.formatting import prompt_ids

        return [prompt_ids(self.tok, "math", self.gsm[(offset + i) % len(self.gsm)]) for i in range(n)]

    def run(self, batch: int, max_tokens: int, caps: list[list[str]] | None = None, offset: int = 0,
            reset_cache: bool = True, salt: bool = True) -> dict:
        """`batch` requests of exactly `max_tokens` tokens (EOS ignored), caps[i] the mode of
        request i; tokens/s of the whole batch, prefill included. `salt`: give mode requests their
        per-mode prefix-cache salt, as VLLMBackend does (False: requests of every mode share cached
        prefix blocks, a cost-only measurement that is wrong for serving)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        caps = caps or [[] for _ in range(batch)]
        prompts = self.prompts(offset, batch)
        if reset_cache:
            self.engine.reset_prefix_cache()  # every arm prefills its prompts
        reqs = []
        for ids, cap in zip(prompts, caps):
            prompt, extra = TokensPrompt(prompt_token_ids=ids), None
            if cap:
                from server import vllm_plugin
                from server.vllm_backend import cache_salt

                key = tuple(sorted(cap))
                if salt:
                    prompt["cache_salt"] = cache_salt([self.be.bank.modes[n] for n in key], 1.0)
                extra = vllm_plugin.extra_args_for(key, 1.0)
            reqs.append((prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                                extra_args=extra)))
        t0 = time.perf_counter()
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
        return {"seconds": dt, "tokens": tokens, "tok_s": tokens / dt}

    def offline_generate(self, prompt_ids: list[list[int]], max_tokens: int, stop: list[str] | None,
                         temperature: float = 0.0) -> dict:
        """vLLM's own offline entry point, `LLM.generate`, on token-id prompts."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=stop or None)
        t0 = time.perf_counter()
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], params, use_tqdm=False)
        dt = time.perf_counter() - t0
        n = [len(o.outputs[0].token_ids) for o in outs]
        return {"seconds": dt, "tokens": sum(n), "n_tokens": n, "texts": [o.outputs[0].text for o in outs]}


def main() -> None:
    cfg = json.loads(sys.argv[1])
    if cfg["arm"] == "stock" and os.environ.get("VLLM_PLUGINS") != "":
        raise SystemExit("the stock arm must run with VLLM_PLUGINS= (empty): no vLLM plugin loaded")
    w = Worker(cfg["arm"], cfg["engine"], cfg.get("store", ""))
    state = w.plugin_state()
    if cfg["arm"] == "stock" and (state["plugin_loaded"] or state["plugin_module_imported"]):
        raise SystemExit(f"the stock arm has the plugin: {state}")
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
    if w.be is not None:
        w.be.close()
    else:
        w.engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
