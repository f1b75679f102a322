"""A PEFT LoRA adapter with random A and nonzero B, so it visibly changes a model's output (tests only)."""
from __future__ import annotations

from pathlib import Path

import torch


def write_random_lora(model_path: Path, out: Path, seed: int = 0, scale: float = 0.2) -> Path:
    """q/k/v/o, r 8, alpha 8 on the model at `model_path`, saved as a PEFT directory at `out`."""
    from peft import LoraConfig, get_peft_model

    from spd_engine import models

    model, _ = models.load(model_path)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            # A too: peft draws it from the global generator, which earlier tests in the process move
            if "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[1] ** -0.5)
            elif "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    peft.save_pretrained(out)
    return out
