"""Shared fixtures: the real bundled model where behaviour matters, a tiny random Llama where
speed matters (it borrows the bundled model's real tokenizer)."""
from __future__ import annotations

import os

import pytest

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
    from random_llama import write_random_llama

    return write_random_llama(tokenizer, tmp_path_factory.mktemp("tiny-llama"))


# The server test modules each define a module-scoped `server` (a real server process); these clients
# talk to whichever one the module defines.
@pytest.fixture(scope="module")
def http(server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def oai(server):
    return server.openai_client()
