"""Sharded, typed loading under ZeRO-3 (``distributed.loading``, issue #14 item 1).

The reference is the plain one-process load (``polar_vbll.models.load_backbone``) of the same folder: after
a sharded load every parameter, gathered, must equal it bitwise and in dtype, and so must the buffers, the
features, the LM head's answer rows and the frozen prefix's fingerprint; each rank must hold only its
partition. Three ranks, so that parameters whose size is not a multiple of the world size are padded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.optional import skip_module_unless

skip_module_unless("deepspeed")  # the ranks are spawned DeepSpeed processes (tests/test_distributed_units.py)

from distributed.loading import ShardedCheckpoint  # noqa: E402
from polar_vbll.config import load_config, packaged_config  # noqa: E402
from polar_vbll.errors import ModelLoadError  # noqa: E402
from polar_vbll.models import build_tiny_llama, load_tokenizer  # noqa: E402
from tests.test_distributed_units import _spawn  # noqa: E402

ANSWER_IDS = [5, 17, 300]


def _model_cfg(path: Path, dtype: str):
    return load_config(packaged_config("run", "tiny"), [
        "model.source=path", f"model.path={path}", f"model.dtype={dtype}",
    ]).model  # fmt: skip


def _save_tiny(path: Path, shard: str | None = None) -> None:
    cfg = load_config(packaged_config("run", "tiny"), []).model
    tok = load_tokenizer(cfg)
    model = build_tiny_llama(cfg, vocab_size=len(tok))
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(str(path), safe_serialization=True, **kw)
    tok.save_pretrained(str(path))


def _compare(rank: int, world: int, folder: str, broken: str) -> dict:
    import deepspeed

    from distributed.engine import local_parameter_bytes
    from distributed.loading import load_backbone_zero3
    from polar_vbll.backbone import answer_head_weight, decoder_of
    from polar_vbll.models import load_backbone
    from polar_vbll.prefix_cache import prefix_fingerprint

    out: dict = {}
    ids = torch.tensor([[1, 5, 9, 30, 2, 7, 11, 40]])
    for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        full, _ = load_backbone(_model_cfg(Path(folder), dtype_name))
        ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
              "bf16": {"enabled": dtype == torch.bfloat16}}  # fmt: skip
        model, _, checkpoint = load_backbone_zero3(_model_cfg(Path(folder), dtype_name), ds)
        reference = dict(full.named_parameters())
        differ = []
        for name, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p]):
                if p.dtype != reference[name].dtype or not torch.equal(p.data, reference[name].data):
                    differ.append(name)
        buffers = dict(full.named_buffers())
        differ += [n for n, b in model.named_buffers() if b.dtype != buffers[n].dtype or not torch.equal(b, buffers[n])]
        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            features = model(ids, output_hidden_states=True).hidden_states[-1]
        rows, _ = checkpoint.answer_head_weight(model, ANSWER_IDS)
        out[dtype_name] = {
            "differ": differ,
            "features": torch.equal(features, full(ids, output_hidden_states=True).hidden_states[-1]),
            "rows": torch.equal(rows, answer_head_weight(full, ANSWER_IDS)[0]),
            "fingerprint": prefix_fingerprint(decoder_of(model), 1, checkpoint.chunks)
            == prefix_fingerprint(decoder_of(full), 1),
            "bytes": local_parameter_bytes(model),
            "dtype_out": str(features.dtype),
        }
    try:
        load_backbone_zero3(_model_cfg(Path(broken), "float32"),
                            {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})  # fmt: skip
        out["broken"] = None
    except ModelLoadError as exc:
        out["broken"] = str(exc)
    return out


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("sharded")
    folder, broken = root / "model", root / "broken"
    _save_tiny(folder, shard="200KB")  # several files and an index: the index path is read
    _save_tiny(broken)
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    return _spawn(_compare, root, 3, str(folder), str(broken))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sharded_loading_gives_the_same_model_and_features_as_a_full_load(three_ranks, dtype):
    for rank in three_ranks:
        got = rank[dtype]
        assert got["differ"] == [], got["differ"]
        assert got["features"] and got["rows"] and got["fingerprint"]
        assert got["dtype_out"] == f"torch.{dtype}"  # typed: built in the configured dtype, no fp32 copy


def test_each_rank_holds_only_its_partition(three_ranks):
    for rank in three_ranks:
        b = rank["float32"]["bytes"]
        # ceil(numel / 3) per parameter: at most one element of padding each
        assert b["local"] <= b["full"] / 3 + 4 * 64, b
        assert b["local"] >= b["full"] / 3 - 1, b
    assert three_ranks[0]["bfloat16"]["bytes"]["full"] * 2 == three_ranks[0]["float32"]["bytes"]["full"]


def test_a_checkpoint_missing_a_tensor_is_refused_naming_it(three_ranks):
    for rank in three_ranks:
        assert rank["broken"] is not None and "'model.norm.weight'" in rank["broken"]
        assert "dist.sharded_load=false" in rank["broken"]


def test_flat_ranges_read_from_the_file_equal_the_flattened_tensor(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"m": torch.randn(7, 5, 3, generator=g), "v": torch.randn(11, generator=g), "s": torch.tensor(2.5)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    checkpoint = ShardedCheckpoint(tmp_path)
    for key, t in tensors.items():
        flat = t.reshape(-1)
        for _ in range(50):
            a, b = sorted(torch.randint(0, flat.numel() + 1, (2,), generator=g).tolist())
            assert torch.equal(checkpoint.read_flat(key, a, b), flat[a:b]), (key, a, b)
    assert torch.equal(checkpoint.rows("m", [6, 0, 3]), tensors["m"][[6, 0, 3]])
    checkpoint.close()


def _embedding_rows(rank: int, world: int) -> dict:
    import deepspeed

    from distributed.embedding import PartitionedEmbedding
    from distributed.engine import import_deepspeed

    import_deepspeed()
    out = {}
    for dtype, bf16 in ((torch.float32, False), (torch.bfloat16, True)):
        ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": bf16}}
        g = torch.Generator().manual_seed(0)
        values = torch.randn(37, 10, generator=g).to(dtype)  # 370 elements: padded over 3 ranks
        values[5, 3], values[7, 0] = -0.0, float("nan")  # the bits must survive, not just the values
        with deepspeed.zero.Init(config_dict_or_path=ds):
            emb = torch.nn.Embedding(37, 10)
        with deepspeed.zero.GatheredParameters([emb.weight], modifier_rank=0), torch.no_grad():
            if rank == 0:
                emb.weight.copy_(values)
        ids = torch.tensor([[5, 0, 36, 7], [7, 7, 1, 20]])
        got = PartitionedEmbedding(emb)(ids)
        want = torch.nn.functional.embedding(ids, values)
        out[str(dtype)] = bool(torch.equal(got.view(torch.int16 if bf16 else torch.int32),
                                           want.view(torch.int16 if bf16 else torch.int32)))  # fmt: skip
        out[f"{dtype} partitioned"] = emb.weight.data.numel() == 0  # never gathered by the lookup
        uneven = (torch.arange(4 * rank + 2) * 7 % 37).reshape(-1, 2)  # each rank its own shape (a shard's batch)
        got, want = PartitionedEmbedding(emb)(uneven), torch.nn.functional.embedding(uneven, values)
        out[f"{dtype} uneven"] = got.shape == want.shape and bool(torch.equal(
            got.view(torch.int16 if bf16 else torch.int32), want.view(torch.int16 if bf16 else torch.int32)))
    return out


def test_a_partitioned_embedding_looks_rows_up_bit_for_bit_without_gathering(tmp_path):
    for rank in _spawn(_embedding_rows, tmp_path, 3):
        assert all(rank.values()), rank
