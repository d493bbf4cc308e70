"""Frozen-prefix states that stream from disk (``train.prefix_cache=stream``): the entry written example by
example as the pass goes (a safetensors file, checked with safetensors' own reader), read back per example,
the same bits and features as the in-memory states, nothing of them held in memory, a worker's shard, and
every way a write can fail: no half-written entry, no temporary file left, one line or one clear error."""

from __future__ import annotations

import errno
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file

from polar_vbll.errors import ConfigError
from polar_vbll.features import FeatureSource, ShardStates, prefix_state_bytes
from polar_vbll.prefix_cache import EntryWriter, PrefixCache, StoredStates
from tests.test_prefix_cache import PrefixPasses, _adapter, _split
from tests.test_prefix_cache import _source as _disk


def _stream(adapter, root, dtype=torch.float16) -> FeatureSource:
    return FeatureSource(adapter.base_model, 0, True, store_dtype=dtype, disk=PrefixCache(root), stream=True)



def _leftovers(root) -> list:
    return list(root.glob(".*.tmp"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_an_entry_written_in_any_order_is_what_safetensors_reads(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    lengths = [3, 1, 5, 2]
    states = [torch.randn(k, 7, generator=g).to(dtype) for k in lengths]
    with PrefixCache(tmp_path).writer("k", lengths, 7, dtype) as writer:
        for i in (2, 0, 3, 1):  # the length-sorted order of a prefix pass, not the examples'
            writer.put(i, states[i])
    path = tmp_path / "k.safetensors"
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert (8 + header) % 8 == 0  # the data starts 8-byte aligned, as safetensors' own writer keeps it
    data = load_file(str(path))  # the reference reader
    assert data["lengths"].tolist() == lengths
    assert torch.equal(data["states"], torch.cat(states))
    stored = StoredStates(path)
    assert len(stored) == 4 and stored.dtype == dtype
    for i in range(4):
        assert torch.equal(stored[i], states[i])
    assert [s.shape[0] for s in stored[1:3]] == [1, 5]
    again = pickle.loads(pickle.dumps(stored))  # a Ray worker gets the path and reopens the file
    assert torch.equal(again[2], states[2])
    assert PrefixCache(tmp_path).open("k", 5) is None  # another split's size: not this entry
    assert not _leftovers(tmp_path)


def test_a_wrong_state_is_refused_and_an_error_inside_the_block_leaves_nothing(tmp_path):
    cache = PrefixCache(tmp_path)
    with pytest.raises(ValueError, match=r"example 0: states \(2, 3\)"), cache.writer("k", [3], 3, torch.float16) as w:
        w.put(0, torch.zeros(2, 3, dtype=torch.float16))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("cut", [100, -1])
def test_a_damaged_entry_does_not_open(tmp_path, cut):
    with PrefixCache(tmp_path).writer("k", [4, 4], 8, torch.float16) as writer:
        writer.put(0, torch.ones(4, 8, dtype=torch.float16))
        writer.put(1, torch.ones(4, 8, dtype=torch.float16))
    path = tmp_path / "k.safetensors"
    path.write_bytes(path.read_bytes()[:cut])
    assert PrefixCache(tmp_path).open("k", 2) is None


def test_streamed_states_are_the_in_memory_states_and_are_not_held(tmp_path, monkeypatch):
    adapter = _adapter(layers=(-1,))
    held, streamed = _split(n=9), _split(n=9)
    _disk(adapter, tmp_path / "disk").prepare(held, batch_size=4, progress=False)
    source = _stream(adapter, tmp_path / "stream")
    source.prepare(streamed, batch_size=4, progress=False)
    assert isinstance(streamed.states, StoredStates)
    assert prefix_state_bytes([streamed]) == 0 and prefix_state_bytes([held]) > 0
    assert streamed.prepared() == 9
    for a, b in zip(held.states, streamed.states, strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():  # the features, streamed or held: the same bits
        idx = [0, 3, 8, 5]
        torch.testing.assert_close(source.features(streamed, idx), source.features(held, idx), rtol=0, atol=0)
    # a second run on the same examples opens the entry: no prefix pass, nothing read whole
    passes = PrefixPasses(monkeypatch)
    again = _split(n=9)
    _stream(_adapter(layers=(-1,)), tmp_path / "stream").prepare(again, batch_size=4, progress=False)
    assert passes.calls == 0 and isinstance(again.states, StoredStates)
    # the same entry serves the default mode too (one format)
    whole = _split(n=9)
    _disk(adapter, tmp_path / "stream").prepare(whole, batch_size=4, progress=False)
    assert passes.calls == 0 and all(torch.equal(a, b) for a, b in zip(whole.states, held.states, strict=True))


def test_a_shard_streams_its_own_examples_only(tmp_path):
    adapter = _adapter()
    own = [1, 4, 6]
    split = _split(n=8)
    _stream(adapter, tmp_path).prepare(split, batch_size=2, progress=False, indices=own)
    assert isinstance(split.states, ShardStates) and split.prepared() == 3
    whole = _split(n=8)
    FeatureSource(adapter.base_model, 0, True, store_dtype=torch.float16).prepare(whole, 2, progress=False)
    for i in range(8):
        if i in own:
            assert torch.equal(split.states[i], whole.states[i])
        else:
            assert split.states[i] is None
    with pytest.raises(ValueError, match="no frozen-prefix states in this process"):
        _stream(adapter, tmp_path).features(split, [0])


def _failing_put(monkeypatch, after: int):
    original = EntryWriter.put
    calls = {"n": 0}

    def put(self, i, states):
        calls["n"] += 1
        if calls["n"] > after:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, i, states)

    monkeypatch.setattr(EntryWriter, "put", put)


def test_a_full_disk_mid_pass_keeps_the_states_in_memory_by_default(tmp_path, monkeypatch, capsys):
    adapter = _adapter()
    reference = _split()
    FeatureSource(adapter.base_model, 0, True, store_dtype=torch.float16).prepare(reference, 4, progress=False)
    _failing_put(monkeypatch, after=3)
    split = _split()
    _disk(adapter, tmp_path).prepare(split, batch_size=4, progress=False)
    assert "not writable (No space left on device)" in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(split.states, reference.states, strict=True))
    assert not list(tmp_path.glob("*.safetensors")) and not _leftovers(tmp_path)


def test_a_full_disk_under_stream_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    _failing_put(monkeypatch, after=3)
    with pytest.raises(ConfigError, match=r"prefix_cache=stream: .* cannot be written \(No space left on device\)"):
        _stream(_adapter(), tmp_path).prepare(_split(), batch_size=4, progress=False)
    assert not list(tmp_path.glob("*.safetensors")) and not _leftovers(tmp_path)


def test_an_unwritable_folder_under_stream_is_one_clear_error(tmp_path, monkeypatch):
    def refuse(self, *args):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(PrefixCache, "writer", refuse)
    with pytest.raises(ConfigError, match="POLAR_VBLL_PREFIX_CACHE"):
        _stream(_adapter(), tmp_path).prepare(_split(), batch_size=4, progress=False)


def test_an_interrupted_pass_leaves_no_entry_and_no_temporary_file(tmp_path, monkeypatch):
    from polar_vbll.backbone import SplitDecoder

    original, calls = SplitDecoder.prefix_states, {"n": 0}

    def interrupted(this, ids, mask):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(this, ids, mask)

    monkeypatch.setattr(SplitDecoder, "prefix_states", interrupted)
    for source in (_stream(_adapter(), tmp_path), _disk(_adapter(), tmp_path)):
        calls["n"] = 0
        with pytest.raises(KeyboardInterrupt):
            source.prepare(_split(), batch_size=2, progress=False)
        assert not list(tmp_path.iterdir())


def test_a_run_streaming_its_states_trains_the_same_run(tmp_path, monkeypatch):
    """`polar-vbll train` (tiny, PoLAR-VBLL: the head refitted on the whole training split's features) with
    `train.prefix_cache=stream` against the default `disk`, each with its own empty cache: the same losses,
    metrics and head, bit for bit."""
    from typer.testing import CliRunner

    from polar_vbll_cli.app import app

    runs = {}
    for mode in ("disk", "stream"):
        monkeypatch.setenv("POLAR_VBLL_PREFIX_CACHE", str(tmp_path / f"cache-{mode}"))
        result = CliRunner().invoke(app, [
            "train", "--config", "tiny", "--no-progress", "--no-track", "--set", f"output_dir={tmp_path / mode}",
            "--set", "method=polar_vbll", "--set", f"train.prefix_cache={mode}",
        ])  # fmt: skip
        assert result.exit_code == 0, result.output
        runs[mode] = tmp_path / mode / "tiny"
        assert list((tmp_path / f"cache-{mode}").glob("*.safetensors"))
    disk, stream = (json.loads((runs[m] / "results.json").read_text()) for m in ("disk", "stream"))
    assert disk["metrics"] == stream["metrics"]
    def steps(run):  # every logged value but the clock
        return [{k: v for k, v in row.items() if k != "seconds"} for row in run["training"]["history"]]

    assert steps(disk) == steps(stream) and len(steps(disk)) == 6
    assert (runs["disk"] / "head.safetensors").read_bytes() == (runs["stream"] / "head.safetensors").read_bytes()
    params = json.loads((runs["stream"] / "params.json").read_text())
    assert params["train.prefix_cache"] == "stream"


def test_an_empty_shard_streams_nothing_and_refuses_nothing(tmp_path):
    split = _split(n=4)
    _stream(_adapter(), tmp_path).prepare(split, batch_size=2, progress=False, indices=[])
    assert split.prepared() == 0 and all(s is None for s in split.states)
