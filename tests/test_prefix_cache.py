"""The persistent frozen-prefix cache (polar_vbll.prefix_cache): reused on a matching key, recomputed on
every kind of mismatch (frozen weights, split block, token ids from the examples / tokenizer / prompt
settings, storage precision), never reused half-written, and the same features warm or cold."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from polar_vbll.adapters.config import LoraConfig
from polar_vbll.adapters.lora import LoraAdapter
from polar_vbll.backbone import SplitDecoder
from polar_vbll.features import EncodedSplit, FeatureSource, encode_examples
from polar_vbll.prefix_cache import PrefixCache
from polar_vbll.tasks import MCExample
from tests.conftest import make_tiny_llama

FIXTURES = Path(__file__).parent / "fixtures"


def _adapter(layers=(-1,), seed: int = 0, vocab: int = 128) -> LoraAdapter:
    cfg = LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], layers=list(layers))
    return LoraAdapter(make_tiny_llama(seed=seed, layers=3, vocab_size=vocab), cfg)


def _split(seed: int = 0, n: int = 6) -> EncodedSplit:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 10, (n,), generator=g).tolist()
    ids = [torch.randint(3, 128, (k,), generator=g).tolist() for k in lengths]
    return EncodedSplit("s", ids, torch.zeros(n, dtype=torch.long), torch.full((n,), 2))


class PrefixPasses:
    """Counts the frozen-prefix passes (SplitDecoder.prefix_states calls)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = SplitDecoder.prefix_states

        def counting(this, ids, mask):
            self.calls += 1
            return original(this, ids, mask)

        monkeypatch.setattr(SplitDecoder, "prefix_states", counting)


def _source(adapter, root, dtype=torch.float16) -> FeatureSource:
    return FeatureSource(adapter.base_model, 0, True, store_dtype=dtype, disk=PrefixCache(root))


def _entries(root: Path) -> set[str]:
    return {p.name for p in root.glob("*.safetensors")}


def test_a_matching_key_reuses_the_states_from_disk(tmp_path, monkeypatch):
    passes = PrefixPasses(monkeypatch)
    adapter = _adapter()
    first = _split()
    _source(adapter, tmp_path).prepare(first, batch_size=4, progress=False)
    assert passes.calls > 0 and len(_entries(tmp_path)) == 1
    passes.calls = 0
    again = _split()  # a new split object with the same ids: another run, seed or method
    other_run = _source(_adapter(), tmp_path)  # a new model object with the same frozen weights
    other_run.prepare(again, batch_size=4, progress=False)
    assert passes.calls == 0
    for a, b in zip(first.states, again.states, strict=True):
        assert a.dtype == torch.float16 and torch.equal(a, b)
    with torch.no_grad():  # warm or cold, the features are the same bits
        torch.testing.assert_close(other_run.features(again, [0, 2, 5]), other_run.features(first, [0, 2, 5]),
                                   rtol=0, atol=0)  # fmt: skip


def _encoded(tok, add_bos: bool = False, max_length: int = 300, question: str = "Is it?") -> EncodedSplit:
    long = " A question with a long body that a tighter budget shortens." * 2
    examples = [MCExample(uid=f"q{i}", question=f"{question} {i}{long}", choices=("yes", "no"), answer=i % 2,
                          source="t")
                for i in range(4)]  # fmt: skip
    return encode_examples("s", examples, tok, max_length=max_length, add_bos=add_bos)


@pytest.mark.parametrize(
    "kind",
    ["frozen weights", "split block", "examples", "tokenizer setting (add_bos)", "prompt budget (max_length)",
     "storage dtype"],
)  # fmt: skip
def test_each_kind_of_mismatch_computes_afresh(tmp_path, monkeypatch, kind):
    tok = AutoTokenizer.from_pretrained(str(FIXTURES / "llama2_style_tokenizer"))
    passes = PrefixPasses(monkeypatch)
    vocab = len(tok)
    base = {"adapter": _adapter(vocab=vocab), "split": _encoded(tok), "dtype": torch.float16}
    _source(base["adapter"], tmp_path, base["dtype"]).prepare(base["split"], 4, progress=False)
    changed = dict(base)
    if kind == "frozen weights":
        changed["adapter"] = _adapter(seed=1, vocab=vocab)
    elif kind == "split block":
        changed["adapter"] = _adapter(layers=(-2, -1), vocab=vocab)
    elif kind == "examples":
        changed["split"] = _encoded(tok, question="Is it so?")
    elif kind == "tokenizer setting (add_bos)":
        changed["split"] = _encoded(tok, add_bos=True)
    elif kind == "prompt budget (max_length)":
        changed["split"] = _encoded(tok, max_length=70)
    else:
        changed["dtype"] = torch.bfloat16
    if changed["split"] is not base["split"]:
        assert changed["split"].ids != base["split"].ids
    passes.calls = 0
    _source(changed["adapter"], tmp_path, changed["dtype"]).prepare(changed["split"], 4, progress=False)
    assert passes.calls > 0, f"a {kind} change reused the cached states"
    assert len(_entries(tmp_path)) == 2


def test_states_in_memory_are_checked_against_the_model_too(tmp_path, monkeypatch):
    """A split whose states were computed under one backbone is not read by another (in one process)."""
    passes = PrefixPasses(monkeypatch)
    split = _split()
    FeatureSource(_adapter().base_model, 0, True).prepare(split, 4, progress=False)
    passes.calls = 0
    FeatureSource(_adapter(seed=2).base_model, 0, True).prepare(split, 4, progress=False)
    assert passes.calls > 0


def test_a_weight_edited_in_place_changes_the_key():
    adapter = _adapter()
    source = FeatureSource(adapter.base_model, 0, True)
    before = source.key(_split())
    with torch.no_grad():
        adapter.base_model.model.layers[0].mlp.up_proj.weight.add_(1e-3)
    assert source.key(_split()) != before


def test_a_damaged_entry_is_recomputed_and_replaced(tmp_path, monkeypatch):
    passes = PrefixPasses(monkeypatch)
    adapter = _adapter()
    _source(adapter, tmp_path).prepare(_split(), 4, progress=False)
    (entry,) = tmp_path.glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:100])  # a truncated file (a full disk, a killed copy)
    passes.calls = 0
    fresh = _split()
    _source(adapter, tmp_path).prepare(fresh, 4, progress=False)
    assert passes.calls > 0
    assert PrefixCache(tmp_path).load(entry.stem, len(fresh)) is not None  # replaced by a whole entry
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_an_unwritable_cache_folder_keeps_the_states_in_memory(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    try:
        split = _split()
        _source(_adapter(), root).prepare(split, 4, progress=False)
    finally:
        root.chmod(0o700)
    assert split.states is not None and "not writable" in capsys.readouterr().out


def test_half_precision_states_are_the_rounded_full_precision_states():
    adapter = _adapter()
    full, half = _split(), _split()
    FeatureSource(adapter.base_model, 0, True).prepare(full, 4, progress=False)
    FeatureSource(adapter.base_model, 0, True, store_dtype=torch.float16).prepare(half, 4, progress=False)
    for a, b in zip(full.states, half.states, strict=True):
        assert a.dtype == torch.float32 and b.dtype == torch.float16
        assert torch.equal(a.to(torch.float16), b)


def test_states_beyond_the_storage_dtype_are_refused_before_anything_is_stored(tmp_path):
    """float16 overflows above 65504: such states would become inf and reach the head much later as
    non-finite features. The pass stops with the setting to change, and nothing is written."""
    from polar_vbll.errors import ConfigError

    adapter = _adapter()
    with torch.no_grad():
        adapter.base_model.model.embed_tokens.weight.mul_(1e6)  # the residual stream carries it through
    with pytest.raises(ConfigError, match="prefix_cache_dtype: bfloat16 or float32"):
        _source(adapter, tmp_path).prepare(_split(), 4, progress=False)
    assert _entries(tmp_path) == set()
    FeatureSource(adapter.base_model, 0, True, store_dtype=torch.bfloat16).prepare(_split(), 4, progress=False)
