"""Phase 2b: distillation. LoRA fine-tune of the original model (no projection) on the corpus,
next-token loss on completion tokens only. Writes a standard PEFT adapter directory atomically."""
from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from .config import DistillConfig
from .formatting import answer_ids, text_prompt_ids

TRAINING_REPORT = "training_report.json"  # beside the adapter's PEFT files


def training_ids(tok, rows: list[dict], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per corpus row; labels are -100 on prompt tokens."""
    out = []
    for row in rows:
        p = text_prompt_ids(tok, row["prompt"])
        a, _ = answer_ids(tok, row["completion"], eos=row.get("finish_reason") == "stop")
        if not a:
            continue
        ids = (p + a)[:max_length]
        labels = ([-100] * len(p) + a)[:max_length]
        if any(label != -100 for label in labels):
            out.append((ids, labels))
    return out


def distill(model, tok, rows: list[dict], out_dir: Path, cfg: DistillConfig,
            progress: Callable[[int, int, float], None] | None = None) -> dict:
    """Train a LoRA adapter on `rows` and save it to `out_dir`. progress(step, total, loss)."""
    from peft import LoraConfig, get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    cfg.check()
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; choose a new adapter directory")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    data = training_ids(tok, rows, cfg.max_length)
    if not data:
        raise ValueError("the corpus has no completion tokens to train on")
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    total = cfg.steps if cfg.steps is not None else steps_per_epoch * cfg.epochs
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=0, num_training_steps=total)
    order = list(range(len(data)))
    device = next(peft_model.parameters()).device  # each batch goes where the model is
    losses, step, started = [], 0, time.perf_counter()
    trained_tokens = 0  # supervised (completion) tokens seen by the optimiser, over all steps
    while step < total:
        random.shuffle(order)
        for s in range(0, len(order), cfg.batch_size):
            if step == total:
                break
            batch = [data[i] for i in order[s : s + cfg.batch_size]]
            trained_tokens += sum(label != -100 for _, lab in batch for label in lab)
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i, _ in batch])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
            loss = peft_model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            losses.append(loss.item())
            if progress:
                progress(step, total, losses[-1])
    peft_model.eval()
    last = losses[-min(steps_per_epoch, len(losses)):]
    report = {"examples": len(data), "steps": total, "first_loss": losses[0], "last_loss": losses[-1],
              "mean_last_epoch_loss": sum(last) / len(last),
              "corpus_tokens": sum(label != -100 for _, lab in data for label in lab),
              "trained_tokens": trained_tokens, "epochs_seen": round(total / steps_per_epoch, 2),
              "seconds": round(time.perf_counter() - started, 2), "config": cfg.model_dump(mode="json")}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        peft_model.save_pretrained(tmp)
        (tmp / TRAINING_REPORT).write_text(json.dumps(report, indent=2))
        tmp.chmod(0o755)
        tmp.rename(out_dir)  # atomic: a half-written adapter is never visible
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
