"""Shared test fixtures: tiny random models built from a transformers config (nothing downloads)."""

from __future__ import annotations

import pytest
import torch

from tests.optional import skip_marked


def pytest_collection_modifyitems(config, items):
    """Tests marked ``@pytest.mark.extras(...)`` are skipped, naming the extra, when a package is missing."""
    skip_marked(items)


def make_tiny_llama(seed: int = 0, vocab_size: int = 128, hidden: int = 64, layers: int = 2):
    """A tiny random LlamaForCausalLM in fp32 (hidden 64, 2 layers, 4 heads, 2 KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.eval()
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(autouse=True, scope="session")
def _private_caches(tmp_path_factory):
    """Every test session gets its own frozen-prefix disk cache (polar_vbll.prefix_cache) and token cache
    (polar_vbll.token_cache), so tests never read a developer's cache or each other's leftovers from an
    earlier session."""
    import os

    names = ("POLAR_VBLL_PREFIX_CACHE", "POLAR_VBLL_TOKEN_CACHE")
    old = {name: os.environ.get(name) for name in names}
    os.environ["POLAR_VBLL_PREFIX_CACHE"] = str(tmp_path_factory.mktemp("prefix-cache"))
    os.environ["POLAR_VBLL_TOKEN_CACHE"] = str(tmp_path_factory.mktemp("token-cache"))
    yield
    for name, value in old.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
