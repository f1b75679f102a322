"""Shared fixtures: the real bundled model where behaviour matters, a tiny random Llama where
speed matters (it borrows the bundled model's real tokenizer)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def bundled_path():
    from spd_engine import models

    return models.resolve(models.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def hf_backend(bundled_path):
    from spd_engine.hf_backend import HFBackend

    return HFBackend(str(bundled_path))


@pytest.fixture(scope="session")
def tokenizer(bundled_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_path)


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory, tokenizer):
    """A 2-layer random Llama (4 heads, 2 KV heads x 16) saved as a local HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# The server test modules each define a module-scoped `server` (a real server process); these clients
# talk to whichever one the module defines.
@pytest.fixture(scope="module")
def http(server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def oai(server):
    return server.openai_client()
