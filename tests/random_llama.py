"""A 2-layer random Llama with 4 heads and 2 KV heads, saved as a local HF directory with the
bundled model's real tokenizer (tests only: where speed matters, or where a head count must split)."""
from __future__ import annotations

from pathlib import Path

import torch


def write_random_llama(tokenizer, path: Path, head_dim: int = 16) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hidden = 4 * head_dim
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
