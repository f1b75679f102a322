"""The library on a device without vLLM (torch, transformers, peft only: it runs where vLLM is not
installed or would not load): calibration, projection equal to the CPU's, the capture-safe op
captured and replayed with new routes (on the CPU, which has no CUDA graphs, compiled with
torch.compile(fullgraph=True): both need one graph of tensor ops, no host reads), hooked / unhooked
tokens/s, a few distillation steps; one JSON object.

    python bench/gpu_check.py --device cuda [--out F]          # one H200: well under 8 minutes
    python bench/gpu_check.py --device cpu --quick [--out F]   # this CPU: about a minute
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import hf_tok_s, interleave, random_pack, ratios  # noqa: E402

from spd_engine.atomic import write_json  # noqa: E402
from spd_engine.bank import ProjectionBank  # noqa: E402
from spd_engine.calibrate import CalibrationConfig, calibrate  # noqa: E402
from spd_engine.data import load_examples, resolve_data  # noqa: E402
from spd_engine.distill import DistillConfig, distill, training_ids  # noqa: E402
from spd_engine.formatting import prompt_ids  # noqa: E402
from spd_engine.hf_backend import HFBackend  # noqa: E402
from spd_engine.projection import NO_MODE, RouteBuffers, SiteBank, project_routed  # noqa: E402
from spd_engine.tasks import Example, user_message  # noqa: E402

TOL = 1e-4  # float32 on both sides (TF32 is off by default in torch): differences are rounding only


def timed(fn: Callable[[], object], device: str) -> tuple[object, float]:
    """fn() and its seconds, the device's queued work included."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def routes(n: int, n_slots: int, count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` random routes of n tokens (host tensors): slots in NO_MODE..n_slots-1, strengths in
    [0, 1] with some exactly 0 and 1, so every kind of row occurs in each."""
    g = torch.Generator().manual_seed(seed)
    out = [(torch.randint(NO_MODE, n_slots, (n,), generator=g), torch.rand(n, generator=g)) for _ in range(count)]
    for _, strength in out:
        strength[::5], strength[1::7] = 1.0, 0.0
    return out


def on(bank: SiteBank, device: str) -> SiteBank:
    return SiteBank(bank.W.to(device), bank.col_slot.to(device), bank.covers.to(device))


def projection(bank: ProjectionBank, device: str, n: int = 256) -> dict:
    """`SiteBank.apply` (the grouped form) on the device against the CPU, at every site, for a
    mixed route: every slot, NO_MODE rows, strengths 0..1, a slot that skips some sites."""
    (slot, strength), = routes(n, len(bank.slots), 1)
    diffs, g = {}, torch.Generator().manual_seed(0)
    for site, sb in bank.sites.items():
        x = torch.randn(n, sb.W.shape[0], generator=g)
        want = sb.apply(x, slot, strength)
        got = on(sb, device).apply(x.to(device), slot.to(device), strength.to(device)).cpu()
        diffs[f"L{site[0]}.{site[1]}"] = float((got - want).abs().max())
    return {"rows": n, "slots": [list(c) for c in bank.slots], "max_abs_diff": diffs, "ok": max(diffs.values()) < TOL}


def captured(sb: SiteBank, device: str, n: int = 64, count: int = 4) -> dict:
    """The capture-safe op captured once (static x and RouteBuffers), then replayed with new x and
    new routes copied into those same tensors, against eager `SiteBank.apply` on the device."""
    sb = on(sb, device)
    buf, x = RouteBuffers(n, device), torch.zeros(n, sb.W.shape[0], device=device)

    def op() -> torch.Tensor:
        return project_routed(x, sb.W, sb.col_slot, sb.covers, buf.slot, buf.strength)

    if device == "cuda":
        kind = "cuda-graph"
        side = torch.cuda.Stream()  # warm up off the capture stream, as torch.cuda.graph requires
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            op()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = op()

        def step() -> torch.Tensor:
            graph.replay()  # reads x and the buffers as they are now
            return static_out.clone()
    else:
        kind = "torch.compile"
        compiled = torch.compile(op, fullgraph=True, dynamic=False)  # inductor, one static graph
        compiled()  # the one compilation (every row NO_MODE)

        def step() -> torch.Tensor:
            with torch._dynamo.config.patch(error_on_recompile=True):  # a new route must not recompile
                return compiled()
    diffs, outs = [], []
    g = torch.Generator().manual_seed(1)
    for slot, strength in routes(n, len(sb.covers), count, seed=1):
        x.copy_(torch.randn(n, sb.W.shape[0], generator=g))
        buf.write(slot, strength)
        out = step()
        outs.append(out.cpu())
        diffs.append(float((out - sb.apply(x, slot.to(device), strength.to(device))).abs().max()))
    differ = all(float((a - b).abs().max()) > 1e-3 for a, b in zip(outs, outs[1:]))  # each route really is new
    return {"capture": kind, "rows": n, "routes": count, "max_abs_diff": diffs, "routes_differ": differ,
            "ok": differ and max(diffs) < TOL}


def generation(be: HFBackend, prompts: list[list[int]], tokens: int, reps: int, mode: str) -> dict:
    """Greedy tokens/s with every row in `mode` / without, interleaved after a short warm-up."""
    arm = lambda cap: lambda i: round(hf_tok_s(be, prompts, cap, tokens if i >= 0 else 2), 1)  # noqa: E731
    tok_s = interleave({"unhooked": arm(()), "hooked": arm((mode,))}, reps)
    return {"batch": len(prompts), "max_tokens": tokens, "reps": reps, "tok_s": tok_s,
            "hooked_over_unhooked": round(ratios(tok_s["hooked"], tok_s["unhooked"])["median"], 3)}


def mean_loss(model: torch.nn.Module, data: list[tuple[list[int], list[int]]]) -> float:
    """Completion-token loss per example, averaged (eval mode: no dropout)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return sum(float(model(input_ids=torch.tensor([i], device=device), labels=torch.tensor([lab], device=device)).loss)
                   for i, lab in data) / len(data)


def distillation(be: HFBackend, examples: list[Example], steps: int, device: str) -> dict:
    """A few LoRA steps on the gold answers (lr 1e-3, not the paper's 1e-5, so a few steps move the
    loss). Last: peft injects the LoRA layers into the backend's model in place."""
    rows = [{"prompt": user_message("math", ex), "completion": ex.answer, "finish_reason": "stop"} for ex in examples]
    cfg = DistillConfig(steps=steps, batch_size=4, lr=1e-3)
    data = training_ids(be.tokenizer, rows, cfg.max_length)
    before = mean_loss(be.model, data)
    with tempfile.TemporaryDirectory() as tmp:
        _, seconds = timed(lambda: distill(be.model, be.tokenizer, rows, Path(tmp) / "adapter", cfg), device)
    after = mean_loss(be.model, data)
    return {"examples": len(data), "steps": steps, "lr": cfg.lr, "loss_before": round(before, 4),
            "loss_after": round(after, 4), "seconds": round(seconds, 2), "ok": after < before}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--model", default="smollm2-135m", help="the bundled model (default) or a local HF directory")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke check)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here (use --device cpu)")
    size = lambda quick, full: quick if args.quick else full  # noqa: E731
    started = time.perf_counter()
    be = HFBackend(args.model, batch_size=size(2, 8), device=args.device)
    gsm = load_examples(resolve_data("gsm8k"), "math")
    examples = gsm[: size(4, 8)]  # gradient calibration with the model on the device
    pack, seconds = timed(lambda: calibrate(be.model, be.tokenizer, be.model_info, "math", examples, "gc-math",
                                            CalibrationConfig(batch_size=4)), args.device)
    # a second mode on the last layer only, and their composition: slots that skip a site
    last = be.model_info.n_layers - 1
    rand = random_pack(be.model_info, "gc-rand", rank=16, layers=[last])
    bank = ProjectionBank({pack.name: pack, rand.name: rand}, slots=[(pack.name, rand.name)])
    be.add_subspace(pack)
    result = {
        "device": args.device, "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "quick": args.quick, "model": args.model, "torch": torch.__version__, "cuda": torch.version.cuda,
        "calibration": {"examples": len(examples), "seconds": round(seconds, 2),
                        "rows": pack.manifest.calibration.n_rows, "ranks": pack.manifest.ranks},
        "projection": projection(bank, args.device),
        "captured": (cap := captured(bank.sites[(last, "k")], args.device)), "capture": cap["capture"],
        "generation": generation(be, [prompt_ids(be.tokenizer, "math", ex) for ex in gsm[20 : 20 + size(2, 8)]],
                                 size(8, 64), size(1, 3), pack.name),
        "distillation": distillation(be, examples, size(3, 10), args.device),
        "vllm_imported": sys.modules.get("vllm") is not None,  # the check is that it never is
        "seconds": round(time.perf_counter() - started, 1),
        "load_average_1m": round(os.getloadavg()[0], 2),  # other work on the machine skews the timings
    }
    print(json.dumps(result, indent=2))
    if args.out:
        write_json(args.out, result)
    ok = result["projection"]["ok"] and result["captured"]["ok"] and not result["vllm_imported"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
