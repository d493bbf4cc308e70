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
temporary file as the prefix pass goes (:class:`EntryWriter`: one batch in memory at a time) and renamed, so
a crash never leaves a half-written entry. An entry is read whole (:meth:`PrefixCache.load`) or example by
example from the file (:meth:`PrefixCache.open`, :class:`StoredStates`: ``train.prefix_cache=stream``, the
states never all in memory). ``<root>`` is
``$POLAR_VBLL_PREFIX_CACHE`` when set, else ``$POLAR_VBLL_CACHE/prefix`` (``~/.cache/polar-vbll/prefix``).
Deleting the folder is always safe.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

#: Bumped when the way the prefix states are computed changes (masking, positions): old entries then miss.
FORMAT_VERSION = 1

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: The safetensors names of the storage dtypes (https://huggingface.co/docs/safetensors, "Format").
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


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

    def open(self, key: str, n: int) -> StoredStates | None:
        """The ``n`` per-example states of entry ``key``, read from the file example by example when indexed
        (:class:`StoredStates`: nothing of them held in memory), or None on a miss or a damaged entry."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            stored = StoredStates(path)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return stored if len(stored) == n else None

    def writer(self, key: str, lengths: Sequence[int], width: int, dtype: torch.dtype) -> EntryWriter:
        """An :class:`EntryWriter` for entry ``key`` (``lengths[i]`` rows of ``width`` values in ``dtype`` for
        example ``i``), the folder created if need be. Raises ``OSError`` when it is not writable."""
        self.root.mkdir(parents=True, exist_ok=True)
        return EntryWriter(self.root, self.path(key), lengths, width, dtype)

    def unwritable(self, exc: OSError) -> None:
        """The one line a run prints when an entry cannot be written (its states then stay in memory)."""
        print(f"note: the frozen-prefix cache {self.root} is not writable ({exc.strerror or exc}); states kept "
              "in memory only", flush=True)  # fmt: skip


def _header(lengths: Sequence[int], width: int, dtype: torch.dtype) -> bytes:
    """The safetensors header of an entry: ``lengths`` (int64, first: 8-byte aligned) then ``states``
    ``(sum(lengths), width)``, padded with spaces so the data starts on an 8-byte boundary (as safetensors'
    own writer does)."""
    n, rows = len(lengths), int(sum(lengths))
    size = rows * width * dtype.itemsize
    header = {
        "lengths": {"dtype": "I64", "shape": [n], "data_offsets": [0, 8 * n]},
        "states": {"dtype": _ST_DTYPES[dtype], "shape": [rows, width], "data_offsets": [8 * n, 8 * n + size]},
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return len(text).to_bytes(8, "little") + text


class EntryWriter:
    """Writes one cache entry example by example, in any order, to a temporary file in the cache folder
    (its final size allocated up front), renamed to the entry's name on a clean exit from its ``with``
    block and removed on an error: only one batch of states is ever in memory. The file is a safetensors
    file (read back by ``safetensors.torch.load_file``; safetensors has no writer by parts, hence this one).

    Raises ``OSError`` (disk full, folder removed); ``ValueError`` for a state of the wrong shape or dtype."""

    def __init__(self, root: Path, path: Path, lengths: Sequence[int], width: int, dtype: torch.dtype) -> None:
        self.path, self.width, self.dtype = path, width, dtype
        self.lengths = [int(k) for k in lengths]
        header = _header(self.lengths, width, dtype)
        self._row_bytes = width * dtype.itemsize
        *self._starts, total = itertools.accumulate(self.lengths, initial=0)  # each example's first row
        self._data = len(header) + 8 * len(self.lengths)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=root)
        self._fd: int | None = fd
        try:
            os.ftruncate(fd, self._data + total * self._row_bytes)
            os.pwrite(fd, header, 0)
            os.pwrite(fd, torch.tensor(self.lengths, dtype=torch.int64).numpy().tobytes(), len(header))
        except BaseException:
            self.abort()
            raise

    def put(self, i: int, states: torch.Tensor) -> None:
        """Write example ``i``'s states ``(lengths[i], width)`` in the entry's dtype."""
        if tuple(states.shape) != (self.lengths[i], self.width) or states.dtype != self.dtype:
            raise ValueError(f"example {i}: states {tuple(states.shape)} {states.dtype}, expected "
                             f"({self.lengths[i]}, {self.width}) {self.dtype}")  # fmt: skip
        assert self._fd is not None
        data = states.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        os.pwrite(self._fd, data, self._data + self._starts[i] * self._row_bytes)

    def commit(self) -> Path:
        """Flush, close and rename the file to the entry's name; returns that path. ``OSError`` removes it."""
        assert self._fd is not None
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Close and remove the temporary file (no entry is written)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)

    def __enter__(self) -> EntryWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class StoredStates(Sequence[torch.Tensor]):
    """The per-example states of one cache entry, read from its file when indexed (``states[i]``:
    ``(lengths[i], width)`` in the entry's dtype, a fresh tensor each time; the page cache, not this
    process, holds the file). What ``train.prefix_cache=stream`` keeps instead of the states themselves: its
    memory is the lengths (8 bytes an example). Pickles as its path (a Ray worker reopens the file).

    Raises ``ValueError`` when the file is not a well-formed entry (sizes, dtype, lengths), ``OSError``
    when it cannot be read."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 2 <= size <= 1 << 20:
                raise ValueError(f"{self.path}: not a frozen-prefix entry (header of {size} bytes)")
            header = json.loads(fh.read(size))
            lengths_meta, states_meta = header["lengths"], header["states"]
            by_name = {v: k for k, v in _ST_DTYPES.items()}
            if lengths_meta["dtype"] != "I64" or states_meta["dtype"] not in by_name:
                raise ValueError(f"{self.path}: unexpected dtypes {lengths_meta['dtype']}, {states_meta['dtype']}")
            self.dtype = by_name[states_meta["dtype"]]
            (n,), (rows, self.width) = lengths_meta["shape"], states_meta["shape"]
            begin, end = lengths_meta["data_offsets"]
            fh.seek(8 + size + begin)
            raw = fh.read(end - begin)
            if len(raw) != 8 * n:
                raise ValueError(f"{self.path}: truncated")
            self.lengths = torch.frombuffer(bytearray(raw), dtype=torch.int64)
        self._row_bytes = self.width * self.dtype.itemsize
        s_begin, s_end = states_meta["data_offsets"]
        if int(self.lengths.sum()) != rows or s_end - s_begin != rows * self._row_bytes:
            raise ValueError(f"{self.path}: the lengths do not add up to the states")
        if self.path.stat().st_size != 8 + size + max(end, s_end):
            raise ValueError(f"{self.path}: truncated")
        self._starts = torch.cumsum(self.lengths, 0) - self.lengths
        self._data = 8 + size + s_begin
        self._fd: int | None = None

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        k = int(self.lengths[i])
        buf = bytearray(k * self._row_bytes)
        got = os.preadv(self._fd, [buf], self._data + int(self._starts[i]) * self._row_bytes)
        if got != len(buf):
            raise OSError(f"{self.path}: short read of example {i} ({got} of {len(buf)} bytes)")
        return torch.frombuffer(buf, dtype=self.dtype).view(k, self.width) if buf else torch.empty(
            (0, self.width), dtype=self.dtype)  # fmt: skip

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fd"] = None
        return state

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)  # type: ignore[arg-type]
            self._fd = None
