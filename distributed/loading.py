"""Sharded, typed loading of the frozen backbone under ZeRO-3: no rank ever holds the whole model.

A plain load (``polar_vbll.models.load_backbone``) materialises every weight on every rank and leaves
partitioning to ``deepspeed.initialize``: the peak memory of a worker is the whole model, whatever the
number of workers. Here instead (issue #14, item 1):

1. the model is constructed inside DeepSpeed's ``zero.Init`` in the configured dtype, with transformers'
   weight initialisation switched off (``no_init_weights``) and RoPE buffers kept in their own dtype
   (transformers' ``prevent_arange_dtype_change``): each module's parameters are partitioned as soon as
   the module exists, so a rank holds ``1/N`` of each (its ``ds_tensor``) plus one module at a time;
2. each rank reads *its own partition* of every parameter straight from the safetensors checkpoint:
   ZeRO-3 flattens a parameter, pads it to a multiple of N and gives rank ``r`` the elements
   ``[r * P, (r + 1) * P)`` with ``P = ceil(numel / N)``; exactly those bytes are read from the safetensors
   file with positioned reads (no memory map, see :class:`ShardedCheckpoint`) and cast to the configured
   dtype. No collective, and no rank holds the full state dict (transformers' own ZeRO-3 load reads the
   whole checkpoint on rank 0).

What needs full weights before the engine exists is read from the file too, never gathered: the LM-head
rows of the answer letters (the heads' start, :meth:`ShardedCheckpoint.answer_head_weight`) and the
frozen prefix's fingerprint (the disk cache key, :meth:`ShardedCheckpoint.chunks`, hashed block by block
to the same value as a full load's).

Supported: checkpoints whose tensor names are the model's (what ``save_pretrained`` writes; a missing
``base_model_prefix`` is tolerated), single-file or sharded (``model.safetensors.index.json``). Anything
else raises :class:`~polar_vbll.errors.ModelLoadError` naming the tensor; ``dist.sharded_load=false`` falls
back to the plain load.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from polar_vbll.config import ModelConfig
from polar_vbll.errors import ModelLoadError
from polar_vbll.models import DTYPES, attention_for, frozen, load_tokenizer, model_dir

#: Rows read per block when hashing a partitioned tensor from the file (bounded memory for huge tensors).
_HASH_BLOCK_ELEMENTS = 1 << 24


def is_partitioned(p: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter (it carries ``ds_tensor``, its local partition)."""
    return hasattr(p, "ds_tensor")


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The shape of the whole parameter (``ds_shape`` under ZeRO-3, where ``p.shape`` is empty)."""
    return tuple(p.ds_shape) if is_partitioned(p) else tuple(p.shape)


#: safetensors dtype names -> torch dtypes (https://github.com/huggingface/safetensors, "Format")
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie in a safetensors file: ``[begin, end)`` from the file's start."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensor table of a safetensors file: an 8-byte little-endian header length, a JSON header of
    ``name -> {dtype, shape, data_offsets}`` (offsets relative to the end of the header)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ModelLoadError(f"{path}: tensor {key!r} has dtype {info['dtype']}, which this loader does not read")
        a, b = info["data_offsets"]
        out[key] = StoredTensor(path, _ST_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + a, 8 + n + b)
    return out


def checkpoint_index(directory: Path) -> dict[str, StoredTensor]:
    """``tensor name -> where it is stored`` for a model folder (one safetensors file, several, or an index)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"model path {directory} holds no *.safetensors weights")
    out: dict[str, StoredTensor] = {}
    for f in files:
        out.update(_read_header(f))
    return out


class ShardedCheckpoint:
    """Reads parts of a safetensors checkpoint: flat element ranges (a rank's partition), rows, blocks.

    Reads are positioned reads of exactly the bytes wanted (``os.pread``), not a memory map: pages of a
    mapped file count in the resident set of every process that touches them, so each worker would appear to
    hold what it only read once (and the frozen prefix's fingerprint reads most of the model). With reads,
    they stay in the node's page cache, shared and reclaimable.

    ``keys``: ``id(parameter) -> tensor name`` for the model it was matched to (:meth:`match`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.files = checkpoint_index(directory)
        self.keys: dict[int, str] = {}
        self._fds: dict[Path, int] = {}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self) -> None:
        self.close()

    def stored_shape(self, key: str) -> tuple[int, ...]:
        return self.files[key].shape

    def match(self, model: nn.Module) -> None:
        """Find each parameter's tensor in the checkpoint (tied parameters appear once); shapes must agree.
        Raises :class:`ModelLoadError` naming the first parameter without a tensor or with another shape."""
        prefix = getattr(model, "base_model_prefix", "") or ""
        for name, p in model.named_parameters():
            candidates = [name]
            if prefix and name.startswith(prefix + "."):
                candidates.append(name[len(prefix) + 1 :])
            elif prefix:
                candidates.append(f"{prefix}.{name}")
            key = next((c for c in candidates if c in self.files), None)
            if key is None:
                raise ModelLoadError(
                    f"{self.directory}: no tensor {name!r} in the checkpoint, so the sharded ZeRO-3 load cannot "
                    "fill it (set dist.sharded_load=false to load the whole model on every worker)"
                )
            stored = self.stored_shape(key)
            if stored != full_shape(p):
                raise ModelLoadError(
                    f"{self.directory}: tensor {key!r} has shape {stored}, the model's "
                    f"parameter {name!r} has {full_shape(p)}"
                )
            self.keys[id(p)] = key

    def key_of(self, p: torch.Tensor) -> str:
        return self.keys[id(p)]

    def read_flat(self, key: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements ``[start, stop)`` of the row-major flattened tensor ``key``, in its stored dtype (only
        those bytes are read). ``out``: a contiguous CPU tensor of ``stop - start`` elements in the stored
        dtype to read into (no intermediate buffer: the sharded load's partitions); returned."""
        t = self.files[key]
        numel = math.prod(t.shape)
        if not 0 <= start <= stop <= numel:
            raise ValueError(f"elements [{start}, {stop}) are outside tensor {key!r} of {numel}")
        size = t.dtype.itemsize
        fd = self._fds.get(t.file)
        if fd is None:
            fd = self._fds[t.file] = os.open(t.file, os.O_RDONLY)
        want = (stop - start) * size
        if out is None:
            if not want:
                return torch.empty(0, dtype=t.dtype)
            out = torch.empty(stop - start, dtype=t.dtype)
        elif out.dtype != t.dtype or out.numel() != stop - start or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"out must be a contiguous CPU {t.dtype} tensor of {stop - start} elements")
        if not want:
            return out
        view, got = memoryview(out.view(torch.uint8).numpy()), 0
        while got < want:  # pread may return fewer bytes than asked
            n = os.preadv(fd, [view[got:]], t.begin + start * size + got)
            if n <= 0:
                raise ModelLoadError(f"{t.file}: tensor {key!r} is truncated")
            got += n
        return out

    def rows(self, key: str, index: Sequence[int]) -> torch.Tensor:
        """Rows ``index`` of tensor ``key`` (each read alone)."""
        shape = self.stored_shape(key)
        row = math.prod(shape[1:])
        return torch.stack([self.read_flat(key, i * row, (i + 1) * row).reshape(shape[1:]) for i in index])

    def chunks(self, p: torch.Tensor) -> Iterator[torch.Tensor]:
        """The whole of parameter ``p`` in row blocks, in the parameter's dtype, for hashing: a partitioned
        parameter is read from the file (the blocks concatenate to what a full load holds); any other tensor
        is yielded as it is."""
        if not is_partitioned(p):
            yield p.detach()
            return
        key, dtype = self.key_of(p), p.ds_tensor.dtype
        numel = math.prod(full_shape(p))
        if numel == 0:
            yield torch.empty(0, dtype=dtype)
        for start in range(0, numel, _HASH_BLOCK_ELEMENTS):
            yield self.read_flat(key, start, min(numel, start + _HASH_BLOCK_ELEMENTS)).to(dtype)

    def answer_head_weight(
        self, model: nn.Module, answer_ids: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``polar_vbll.backbone.answer_head_weight`` for a partitioned model: the LM-head rows of the answer
        tokens, read from the file and rounded through the model's dtype (as a full load holds them), fp32."""
        head = model.get_output_embeddings()

        def rows(p: torch.Tensor) -> torch.Tensor:
            if not is_partitioned(p):
                return p.detach()[list(answer_ids)].to(torch.float32).clone()
            return self.rows(self.key_of(p), answer_ids).to(p.ds_tensor.dtype).to(torch.float32)

        bias = rows(head.bias) if getattr(head, "bias", None) is not None else None
        return rows(head.weight), bias

    def fill_partitions(self, model: nn.Module) -> int:
        """Copy this rank's partition of every parameter from the file (padding zeroed); returns the number
        of elements read. Every parameter must be partitioned (built under ``zero.Init``)."""
        read = 0
        for name, p in model.named_parameters():
            if not is_partitioned(p):
                raise ModelLoadError(f"parameter {name!r} was not partitioned by zero.Init")
            part = p.ds_tensor
            size = part.ds_numel
            rank = dist.get_rank(group=p.ds_process_group)
            start, numel = rank * size, p.ds_numel
            stop = min(numel, start + size)
            with torch.no_grad():
                if start < stop:
                    key = self.key_of(p)
                    target = part.data[: stop - start]
                    if target.dtype == self.files[key].dtype and target.is_contiguous():
                        self.read_flat(key, start, stop, out=target)  # straight into the partition
                    else:  # another stored dtype: read, then cast (one partition's transient)
                        target.copy_(self.read_flat(key, start, stop))
                    read += stop - start
                part.data[max(0, stop - start) :].zero_()
        return read


def _zero3_construction(ds_config: dict[str, Any]):
    """The contexts transformers itself uses to build a ZeRO-3 model, minus its weight initialisation."""
    from transformers import initialization as hf_init
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    from distributed.engine import import_deepspeed

    deepspeed = import_deepspeed()
    stack = contextlib.ExitStack()
    stack.enter_context(hf_init.no_init_weights())
    stack.enter_context(prevent_arange_dtype_change())  # before zero.Init (transformers' note)
    # the dtype comes from the config (bf16 on or off): zero.Init's own ``dtype`` argument is overridden by
    # bf16 on accelerators without fp16 (DeepSpeed 0.19's _set_dtype), the CPU among them
    stack.enter_context(deepspeed.zero.Init(config_dict_or_path=ds_config))
    return stack


def load_backbone_zero3(cfg: ModelConfig, ds_config: dict[str, Any]) -> tuple[nn.Module, Any, ShardedCheckpoint]:
    """``polar_vbll.models.load_backbone`` under ZeRO-3: build the causal LM of ``cfg`` partitioned, in
    ``cfg.dtype``, and fill this rank's partitions from its safetensors files. Returns ``(model, tokenizer,
    checkpoint)``, the model frozen, in eval mode, its pad token set. Every rank must call it (partition sizes
    depend on the world size); ``ds_config``'s bf16 setting must match ``cfg.dtype``.

    Raises :class:`ModelLoadError` for a folder transformers cannot build a model from, or a checkpoint
    whose tensors do not match the model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = load_tokenizer(cfg)
    directory = model_dir(cfg, tokenizer)
    dtype = DTYPES[cfg.dtype]
    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"could not read the model config in {directory}: {exc}") from exc
    with _zero3_construction(ds_config):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention_for(config))
    got = {p.ds_tensor.dtype for p in model.parameters() if is_partitioned(p)}
    if got != {dtype}:
        raise ModelLoadError(
            f"zero.Init built the backbone in {sorted(map(str, got))}, not {dtype}: the DeepSpeed config's bf16 "
            "setting must match model.dtype"
        )
    head = model.get_output_embeddings()
    untied = head.weight if head is not None else None
    model.tie_weights()  # as transformers does after its own zero.Init construction (tied heads share one tensor)
    if untied is not None and head.weight is not untied and is_partitioned(untied):
        # the head's own partition, built before the tie and now unused, stays referenced from DeepSpeed's
        # bookkeeping: free its storage (measured: 126 MB per rank on a 2B model with a 49k vocabulary at 2 ranks)
        untied.ds_tensor.data = torch.empty(0, dtype=untied.ds_tensor.dtype)
    checkpoint = ShardedCheckpoint(directory)
    checkpoint.match(model)
    checkpoint.fill_partitions(model)
    return frozen(model, tokenizer), tokenizer, checkpoint
