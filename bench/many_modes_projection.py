"""Many modes: `SiteBank.apply` alone (no vLLM, no model), the grouped implementation against the
former masked one, with 1 to 256 slots loaded at one site.

The former apply (the masked form, now `SiteBank.apply_routed`, the capture-safe op; the baseline)
multiplies every row by the columns of every loaded slot and masks: a token pays for the whole bank
(S slots x rank r). The grouped apply (spd_engine/projection.py) sorts the rows by slot once per
step and projects each group with its own slot's basis, so a token pays for its own rank; the
number of distinct slots present adds a fixed cost per group (two small matmuls each).

Setting: one site of width 192 (3 KV heads x 64, SmolLM2's), rank 96 (d/2) for every slot, 64
requests; decode-like steps have 1 row per request (64 rows), prefill-like steps 32 (64 x 32 =
2048 rows, each request's rows contiguous, as vLLM flattens a batch). The requests use k =
min(S, 64) distinct slots spread over the S loaded ones (request i -> the (i mod k)-th used slot),
strength 1. Extra rows: all 256 slots loaded but every request in one mode (k = 1); and, for
decode, a batched-gather variant (every row's basis gathered into one bmm: no per-group loop and no
host-side grouping, the alternative to the grouped loop) to justify the choice.

The new arm is called as the vLLM plugin calls it (old call form, `apply(x, slot, strength)`:
the grouping is built at the first call of a step and reused); the cost of building the grouping
once per step is measured on its own (it is shared by every projected site of the step, 2 x
layers). Arms are interleaved (old new old new ...), one ratio per repetition; torch runs on one
thread (the vLLM CPU worker runs the model on one core, and the machine is shared).

    python bench/many_modes_projection.py            # writes bench/results/many_modes_projection.json
    python bench/many_modes_projection.py --quick    # 1 repetition, a smoke check
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, Context, headline, interleave, ratios, spread, write_result  # noqa: E402
from spd_engine.projection import SiteBank, SlotGroups  # noqa: E402

NAME = "many_modes_projection"
TITLE = "SiteBank.apply with many modes loaded: grouped (per-slot matmuls) / former masked form, time per call"
GOAL = None  # reported, not thresholded
USES: set[str] = set()

WIDTH, RANK, REQUESTS, PREFILL_TOKENS = 192, 96, 64, 32
SLOT_COUNTS = (1, 8, 32, 64, 256)


def gathered_apply(stack_t: torch.Tensor, x: torch.Tensor, slot: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """The batched-gather alternative: every row's basis gathered (N, r, w), two bmm. Rows here
    all have a mode; stack_t[s] = U_s^T."""
    G = stack_t.index_select(0, slot)
    px = torch.bmm(G.transpose(1, 2), torch.bmm(G, x[:, :, None]))[:, :, 0]
    return x + strength[:, None] * (px - x)


def make_bank(n_slots: int, seed: int = 0) -> tuple[SiteBank, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    bases = [torch.linalg.qr(torch.randn(WIDTH, RANK, generator=g)).Q for _ in range(n_slots)]
    return SiteBank.build(bases), torch.stack([b.T for b in bases]).contiguous()


def make_step(n_slots: int, used: int, rows_per_request: int, seed: int = 1):
    slots = [j * n_slots // used for j in range(used)]
    per_request = torch.tensor([slots[i % used] for i in range(REQUESTS)])
    slot = per_request.repeat_interleave(rows_per_request)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(slot), 3, WIDTH // 3, generator=g)  # (tokens, KV heads, head_dim), as vLLM has K
    return x, slot, torch.ones(len(slot))


def per_call(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def calls_for(fn, target: float) -> int:
    """How many calls fill about `target` seconds (at least 1), from one timed call."""
    return max(1, round(target / max(per_call(fn, 1), 1e-7)))


def measure(case: dict, reps: int, target: float) -> dict:
    bank, stack_t = make_bank(case["slots"])
    x, slot, strength = make_step(case["slots"], case["used"], case["rows_per_request"])
    old = bank.apply_routed(x, slot, strength)
    new = bank.apply(x, slot, strength)
    err = float((new - old).abs().max())
    assert err < 1e-4, f"grouped and masked apply differ by {err}"

    def new_fn():
        return bank.apply(x, slot, strength)

    def old_fn():
        return bank.apply_routed(x, slot, strength)

    arms_fns = {"old": old_fn, "new": new_fn}
    x2 = x.reshape(len(x), -1)
    if case["gather"]:
        arms_fns["gather"] = lambda: gathered_apply(stack_t, x2, slot, strength)
        assert float((arms_fns["gather"]() - old.reshape(len(x), -1)).abs().max()) < 1e-4
    calls = {k: calls_for(f, target) for k, f in arms_fns.items()}
    times = interleave({k: (lambda i, f=f, c=calls[k]: per_call(f, c)) for k, f in arms_fns.items()}, reps)
    build = [per_call(lambda: SlotGroups(slot), 20) for _ in range(3)]  # once per step, shared by every site
    out = {**case, "rows": len(x), "max_abs_diff_new_vs_old": err, "calls_per_repetition": calls,
           "seconds_per_call": {k: spread(v) for k, v in times.items()},
           "new_over_old": ratios(times["new"], times["old"]),
           "grouping_build_seconds_per_step": statistics.median(build),
           "distinct_slots_in_batch": len(set(slot.tolist()))}
    if case["gather"]:
        out["gather_over_new"] = ratios(times["gather"], times["new"])
    return out


def cases() -> list[dict]:
    out = []
    for phase, rows in (("decode", 1), ("prefill", PREFILL_TOKENS)):
        for s in SLOT_COUNTS:
            out.append({"phase": phase, "rows_per_request": rows, "slots": s, "used": min(s, REQUESTS),
                        "gather": phase == "decode"})
        out.append({"phase": phase, "rows_per_request": rows, "slots": 256, "used": 1, "gather": phase == "decode"})
    return out


def run(ctx: Context) -> dict:
    """In the suite (bench/run.py) torch runs on one thread here, as from this file's own main."""
    before = torch.get_num_threads()
    torch.set_num_threads(getattr(ctx, "torch_threads", None) or 1)
    try:
        return _run(ctx)
    finally:
        torch.set_num_threads(before)


def _run(ctx: Context) -> dict:
    threads = torch.get_num_threads()
    reps, target = ctx.size(1, 5), ctx.size(0.02, 0.15)
    rows, heads = [], []
    for case in cases():
        t0 = time.perf_counter()
        r = measure(case, reps, target)
        rows.append(r)
        label = (f"{case['phase']} ({r['rows']} rows): {case['slots']} slots loaded, {case['used']} used: "
                 f"grouped / masked time")
        heads.append(headline(label, r["new_over_old"], None))
        sp = r["seconds_per_call"]
        print(f"[{NAME}] {case['phase']:7s} S={case['slots']:3d} k={case['used']:2d}: old "
              f"{sp['old']['median'] * 1e3:9.3f} ms  new {sp['new']['median'] * 1e3:7.3f} ms  new/old "
              f"{r['new_over_old']['median']:.4f} [{r['new_over_old']['min']:.4f}, {r['new_over_old']['max']:.4f}]"
              + (f"  gather/new {r['gather_over_new']['median']:.2f}" if "gather_over_new" in r else "")
              + f"  ({time.perf_counter() - t0:.1f} s)", flush=True)
    # a token's cost against its own mode's: new time at S slots / new time with one slot loaded
    for phase in ("decode", "prefill"):
        solo = next(r for r in rows if r["phase"] == phase and r["slots"] == 1)
        for r in rows:
            if r["phase"] == phase:
                r["new_over_new_one_slot"] = (r["seconds_per_call"]["new"]["median"]
                                              / solo["seconds_per_call"]["new"]["median"])
    return {"headline": heads, "model": "none (SiteBank.apply alone on random orthonormal bases)",
            "settings": {"width": WIDTH, "rank": RANK, "requests": REQUESTS, "prefill_tokens_per_request":
                         PREFILL_TOKENS, "slot_counts": list(SLOT_COUNTS), "dtype": "float32",
                         "torch_threads": threads, "repetitions": reps, "seconds_per_arm_per_repetition": target},
            "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 repetition, short arms: a smoke check")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--note", action="append", default=[])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import os

    load = os.getloadavg()
    notes = [*args.note, f"torch threads: {args.threads}",
             f"load average at the start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores"]
    ctx = Context(quick=args.quick, out=args.out, notes=notes)
    ctx.torch_threads = args.threads
    t0 = time.perf_counter()
    payload = run(ctx)
    path = write_result(ctx, NAME, TITLE, "see headline", t0, payload)
    print(f"[{NAME}] -> {path} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
