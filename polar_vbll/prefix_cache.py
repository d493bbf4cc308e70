"""The persistent frozen-prefix cache: the hidden states that the frozen blocks below the adapted ones
produce for a split, kept on disk in half precision and shared by every run, seed, method, search trial
and ``eval`` that feeds the same token ids to the same frozen blocks.

On the cheap path (``train.cache_frozen_prefix``) the blocks below the lowest adapted block never change,
so their output is a pure function of

- the frozen weights: every parameter and buffer of the decoder outside blocks ``split..`` (embeddings,
  blocks ``0..split-1``, rotary buffers, the final norm), hashed, plus the decoder's class and config;
- the split block ``split`` and the model's compute dtype;
- the token ids of every example (which already encode the tokenizer, the prompt template, ``max_length``,
  ``add_bos`` and the examples themselves: anything that changes the ids changes the key);
- the storage dtype (``train.prefix_cache_dtype``).

The key is the sha256 of all of them (:func:`prefix_key`); an entry is reused only on an exact key match
and any mismatch computes afresh, never reuses. Entries are one safetensors file each
(``<root>/<key>.safetensors``: the states of all examples concatenated, plus their lengths), written to a
temporary file and renamed, so a crash never leaves a half-written entry. ``<root>`` is
``$POLAR_VBLL_PREFIX_CACHE`` when set, else ``$POLAR_VBLL_CACHE/prefix`` (``~/.cache/polar-vbll/prefix``).
Deleting the folder is always safe.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

#: Bumped when the way the prefix states are computed changes (masking, positions): old entries then miss.
FORMAT_VERSION = 1

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_root() -> Path:
    """``$POLAR_VBLL_PREFIX_CACHE``, else ``$POLAR_VBLL_CACHE/prefix``, else ``~/.cache/polar-vbll/prefix``."""
    explicit = os.environ.get("POLAR_VBLL_PREFIX_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("POLAR_VBLL_CACHE", Path.home() / ".cache" / "polar-vbll")).expanduser() / "prefix"


def prefix_fingerprint(
    decoder: nn.Module, split: int, chunks: Callable[[torch.Tensor], Iterable[torch.Tensor]] | None = None,
    blocks: str = "layers",
) -> str:  # fmt: skip
    """sha256 (hex) of everything the frozen prefix of ``decoder`` computes with: the class name, the config
    (minus its source path) and the bytes of every parameter and buffer outside blocks ``split..`` (``blocks``:
    the block list's path in ``decoder``, :func:`polar_vbll.architecture.blocks_path`), buffers of any shape
    (a 0-dim scale included). Reads every frozen weight once (about a second for a 135M-parameter model).

    ``chunks(tensor)``: where a tensor's values come from, in consecutive pieces of its flattened bytes (a
    ZeRO-3 rank holds only a partition, and reads the rest from the checkpoint file:
    ``distributed.loading.ShardedCheckpoint.chunks``); by default the tensor itself. Pieces hash to the same
    value as the whole. A tensor's dtype and shape are those of the values read (``ds_shape`` under ZeRO-3)."""
    h = hashlib.sha256()
    h.update(type(decoder).__name__.encode())
    config = getattr(decoder, "config", None)
    if config is not None:
        data = config.to_dict()
        data.pop("_name_or_path", None)
        data.pop("transformers_version", None)
        h.update(json.dumps(data, sort_keys=True, default=str).encode())
    skip = tuple(f"{blocks}.{i}." for i in range(split, len(decoder.get_submodule(blocks))))
    tensors = list(decoder.named_parameters()) + list(decoder.named_buffers())
    for name, t in sorted(tensors, key=lambda kv: kv[0]):
        if name.startswith(skip):
            continue
        shape = tuple(getattr(t, "ds_shape", t.shape))
        pieces = iter(chunks(t)) if chunks is not None else iter([t.detach()])
        first = next(pieces)
        h.update(name.encode())
        h.update(str(first.dtype).encode())
        h.update(str(shape).encode())
        for piece in itertools.chain([first], pieces):
            h.update(piece.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


def ids_digest(ids: Sequence[Sequence[int]]) -> str:
    """sha256 (hex) of a split's token ids, example by example (lengths included)."""
    h = hashlib.sha256()
    for seq in ids:
        h.update(len(seq).to_bytes(4, "little"))
        h.update(torch.tensor(list(seq), dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def prefix_key(model_fingerprint: str, split: int, compute_dtype: torch.dtype, store_dtype: torch.dtype,
               ids_sha256: str) -> str:  # fmt: skip
    """The cache key of one split's prefix states (see the module docstring); ``ids_sha256`` is
    :func:`ids_digest` of the split's token ids."""
    parts = {
        "format": FORMAT_VERSION,
        "model": model_fingerprint,
        "split_block": split,
        "compute_dtype": str(compute_dtype),
        "store_dtype": str(store_dtype),
        "ids": ids_sha256,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]


class PrefixCache:
    """The on-disk store (one folder of safetensors entries). ``load`` returns None on a miss or an
    unreadable entry (which is then recomputed and replaced); ``save`` writes atomically."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str, n: int) -> list[torch.Tensor] | None:
        """The ``n`` per-example states of entry ``key`` (views into one tensor), or None."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            data = load_file(str(path))
            lengths = data["lengths"].tolist()
            states = data["states"]
        except (SafetensorError, OSError, KeyError, RuntimeError):
            return None
        if len(lengths) != n or sum(lengths) != states.shape[0]:
            return None
        return list(states.split(lengths))

    def save(self, key: str, states: Sequence[torch.Tensor]) -> Path | None:
        """Write entry ``key`` (the states of a split in example order); returns its path, or None when the
        folder is not writable (the run goes on with the states in memory)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tensors = {
                "states": torch.cat([s.contiguous() for s in states]),
                "lengths": torch.tensor([s.shape[0] for s in states], dtype=torch.int64),
            }
            fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.root)
            os.close(fd)
            try:
                save_file(tensors, tmp)
                os.replace(tmp, self.path(key))
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as exc:
            print(f"note: the frozen-prefix cache {self.root} is not writable ({exc.strerror}); states kept "
                  "in memory only", flush=True)  # fmt: skip
            return None
        return self.path(key)
