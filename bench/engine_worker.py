"""One vLLM engine in its own process, driven by procs.EngineClient: a JSON command a stdin line
({"op": method, **arguments}), a JSON reply a stdout line; the end of the input closes the engine.

    python bench/engine_worker.py plugin|stock|offline '{engine settings}'

`plugin`: the library's VLLMBackend (vLLM's `LLM` with the plugin, through its entry point), its
modes random packs in its store (a projection's cost does not depend on its basis). `stock`: vLLM's
`LLM` with the same settings and `VLLM_PLUGINS=none`, checked to hold no trace of ours. Both run the
engine in this process (executor `uni`) through the same add_request + step loop: the plugin is the
only difference. `offline`: `LLM` with its own process model, no plugin, for `LLM.generate`."""
import json
import os
import sys
import time
import traceback

from common import MODEL, described, group_cpu_by_process, random_pack  # this script's folder is on the path


def cpu_now() -> float:
    """CPU seconds of this worker's process group (this process and the vLLM processes it started)."""
    return sum(group_cpu_by_process(os.getpgid(0)).values())


class Worker:
    def __init__(self, arm: str, engine: dict):
        from spd_engine import models
        from spd_engine.data import load_examples, resolve_data

        self.arm, self.path = arm, models.resolve(MODEL)
        self.info, self.ids, self.be = models.info(self.path), 0, None
        self.stash, self.current_modes = {}, "default"  # the worker's mode sets by key (use_worker_modes)
        t0 = time.perf_counter()
        if arm == "plugin":
            from spd_engine.vllm_backend import VLLMBackend

            if engine.get("dtype", "float32") != "float32":
                raise ValueError("VLLMBackend serves float32 only")
            self.be = VLLMBackend(str(self.path), max_loras=0, **{k: v for k, v in engine.items() if k != "dtype"})
            self.llm, self.tok = self.be.llm, self.be.tokenizer
        else:
            import torch
            from transformers import AutoTokenizer
            from vllm import LLM

            self.tok = AutoTokenizer.from_pretrained(self.path)
            if arm == "stock":
                if "OMP_NUM_THREADS" not in os.environ:
                    torch.set_num_threads(1)  # as VLLMBackend does for the in-process worker
                engine = {**engine, "distributed_executor_backend": "uni", "tensor_parallel_size": 1, "enable_lora": False}
            self.llm = LLM(model=str(self.path), **engine)  # offline: vLLM's defaults for the rest
        self.start_seconds = time.perf_counter() - t0
        self.engine = self.llm.llm_engine
        self.gsm = load_examples(resolve_data("gsm8k"), "math")

    def state(self) -> dict:
        sched, mod = self.engine.vllm_config.scheduler_config, sys.modules.get("server.vllm_plugin")
        return {"arm": self.arm, "plugin_module_imported": mod is not None, "plugin_active": bool(mod and mod.is_active()),
                **{k: os.environ.get(k) for k in ("VLLM_PLUGINS", "VLLM_ENABLE_V1_MULTIPROCESSING")},
                "store": str(self.be.store.root) if self.be else None, "start_seconds": self.start_seconds,
                "kv_width": self.info.kv_width, "n_layers": self.info.n_layers, "model_dir": str(self.path),
                "max_num_seqs": sched.max_num_seqs, "max_num_batched_tokens": sched.max_num_batched_tokens}

    def add_modes(self, names: list[str], key: str) -> dict:
        """Random packs (mode i seeded i) into the store the plugin serves, in the worker mode set
        `key`: a benchmark's own, holding no other one's modes."""
        self.use_worker_modes(key)
        t0, adding = time.perf_counter(), 0.0
        for i, name in enumerate(names):
            pack = random_pack(self.info, name, seed=i)
            t1 = time.perf_counter()
            self.be.add_subspace(pack)
            adding += time.perf_counter() - t1
        return {"seconds": time.perf_counter() - t0, "add_seconds": adding, "mode": described(pack)}

    def remove_modes(self, names: list[str]) -> dict:
        """`names` out of the store, back to the default mode set; what the worker had loaded."""
        loaded = self.worker_modes()
        for name in names:
            self.be.remove_subspace(name)
        self.use_worker_modes("default")
        return loaded

    def worker_modes(self) -> dict:
        """What the plugin's worker (in this process: executor `uni`) has loaded."""
        from server.vllm_plugin import PLUGIN

        if (m := PLUGIN.modes) is None:
            return {"loaded": 0, "slots": 0, "max_modes": None}
        return {"loaded": len(m.bank.modes), "slots": len(m.bank.slots), "max_modes": m.max_modes,
                "columns_per_site": {f"{layer}{kind}": int(sb.W.shape[1]) for (layer, kind), sb in m.bank.sites.items()}}

    def use_worker_modes(self, key: str) -> dict:
        """Swap the worker's loaded-mode set for the one kept under `key` (empty the first time),
        keeping the current one under its own key: two states of one engine (64 modes loaded vs
        one) measured alternately with the same model, KV cache and scheduler."""
        from server.vllm_plugin import PLUGIN

        if self.arm != "plugin" or os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
            raise RuntimeError("use_worker_modes needs the plugin arm with its worker in this process")
        self.stash[self.current_modes], self.current_modes = PLUGIN.use_modes(self.stash.get(key)), key
        return self.worker_modes()

    def run(self, batch: int, max_tokens: int, caps: list[list[str]] | None = None, style: str = "chat") -> dict:
        """`batch` requests of exactly `max_tokens` tokens (EOS ignored), request i in the mode(s)
        caps[i] (several: a composition); tokens/s of the whole batch, prefill included. Prompts:
        `chat`, the math task's through the chat template (a shared system prompt, as jobs build
        them); `raw`, the bare GSM8K question (no prefix block shared)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from spd_engine.formatting import prompt_ids
        from spd_engine.vllm_requests import extra_args_for

        self.engine.reset_prefix_cache()  # every arm prefills its prompts
        exs = [self.gsm[i % len(self.gsm)] for i in range(batch)]
        ids = [self.tok(e.prompt).input_ids if style == "raw" else prompt_ids(self.tok, "math", e) for e in exs]
        c0, t0, pending, tokens = cpu_now(), time.perf_counter(), set(), 0
        for p, cap in zip(ids, caps or [[]] * batch):
            rid, self.ids = f"b-{self.ids}", self.ids + 1
            pending.add(rid)
            self.engine.add_request(rid, TokensPrompt(prompt_token_ids=p), SamplingParams(
                max_tokens=max_tokens, temperature=0.0, ignore_eos=True, extra_args=extra_args_for(tuple(sorted(cap)), 1.0)))
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

        c0, t0 = cpu_now(), time.perf_counter()
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids],
                                 SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop or None), use_tqdm=False)
        return {"seconds": time.perf_counter() - t0, "cpu_seconds": cpu_now() - c0,
                "tokens": sum(len(o.outputs[0].token_ids) for o in outs)}

    def close(self) -> None:
        self.be.close() if self.be is not None else self.engine.engine_core.shutdown()


def main() -> None:
    arm, engine = sys.argv[1], json.loads(sys.argv[2])
    replies = os.fdopen(os.dup(1), "w", buffering=1)  # line-buffered: a reply goes at its newline
    os.dup2(2, 1)  # vLLM prints to stdout too: into the log, the replies alone on the pipe
    if arm != "plugin" and os.environ.get("VLLM_PLUGINS") != "none":
        raise SystemExit("the stock and offline arms must run with VLLM_PLUGINS=none: no vLLM plugin loaded")
    state = (w := Worker(arm, engine)).state()
    if state["plugin_active"] != (arm == "plugin") or (arm != "plugin" and state["plugin_module_imported"]):
        raise SystemExit(f"the {arm} arm: the plugin imported {state['plugin_module_imported']}, "
                         f"its attention backend patched {state['plugin_active']}")
    print(json.dumps(state), file=replies)
    for cmd in map(json.loads, filter(str.strip, sys.stdin)):
        try:
            out = getattr(w, cmd.pop("op"))(**cmd)
        except Exception:  # noqa: BLE001 - reported to the parent, which raises
            out = {"error": traceback.format_exc()}
        print(json.dumps(out), file=replies)
    w.close()


if __name__ == "__main__":
    main()
