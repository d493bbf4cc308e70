"""A read-only view of many token-id rows kept in two flat arrays (memory-mapped from disk).

``TokenRows`` is what ``EncodedSplit.ids`` holds for a split read from a large file: the token ids of every
row back to back (``ids``, ``(T,)`` unsigned 32-bit) and where each row starts (``offsets``, ``(N + 1,)``
int64, ``offsets[0] == 0``, ``offsets[N] == T``), optionally with ``index``, the rows of the store this view
shows, in its order (``(n,)`` int64). It behaves as the ``list[list[int]]`` of an in-memory split for every
reader of ``EncodedSplit.ids``: ``len``, ``view[i]`` (a ``list[int]``), iteration, and ``==`` against a list.
Nothing is copied but the row asked for, so a 100,000-row split costs its index, not its ids, in RAM.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np


class TokenRows(Sequence):
    """Rows ``index[i]`` of a flat store (module docstring). ``ids``, ``offsets``: numpy arrays (a
    ``numpy.memmap`` or in memory), read, never written; ``index``: None for every row in store order.
    ``reopen``: how a pickled view finds its arrays again (a callable and its arguments, e.g. the cache
    entry's folder), so a view never travels with its ids. Raises ``ValueError`` on inconsistent arrays."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, index: np.ndarray | None = None,
                 reopen: tuple[Any, tuple] | None = None) -> None:  # fmt: skip
        if offsets.ndim != 1 or len(offsets) < 1 or int(offsets[0]) != 0 or int(offsets[-1]) != len(ids):
            raise ValueError("token rows: offsets must start at 0 and end at the number of ids")
        self._ids, self._offsets = ids, offsets
        stored = len(offsets) - 1
        self._index = None if index is None else np.asarray(index, dtype=np.int64)
        if self._index is not None and len(self._index) and (self._index.min() < 0 or self._index.max() >= stored):
            raise ValueError(f"token rows: an index outside the {stored} stored rows")
        self._reopen = reopen

    def _row(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} of {n}")
        i %= n
        return int(self._index[i]) if self._index is not None else i

    def __len__(self) -> int:
        return len(self._offsets) - 1 if self._index is None else len(self._index)

    def __getitem__(self, i):  # type: ignore[override]
        """``view[i]``: row i's ids as a ``list[int]``; ``view[a:b]``: a view of those rows."""
        if isinstance(i, slice):
            return self.select(np.arange(len(self), dtype=np.int64)[i])
        r = self._row(int(i))
        return self._ids[self._offsets[r] : self._offsets[r + 1]].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(len(self)):
            yield self[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (TokenRows, list, tuple)):
            return len(self) == len(other) and all(list(a) == list(b) for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TokenRows({len(self)} rows)"

    def select(self, rows: Sequence[int] | np.ndarray) -> TokenRows:
        """A view of this view's rows ``rows`` (positions in this view), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        index = rows if self._index is None else self._index[rows]
        return TokenRows(self._ids, self._offsets, index, self._reopen)

    def lengths(self) -> np.ndarray:
        """``(n,)`` int64: each row's number of ids, without reading them."""
        starts, ends = self._offsets[:-1], self._offsets[1:]
        sizes = np.asarray(ends - starts, dtype=np.int64)
        return sizes if self._index is None else sizes[self._index]

    def __reduce__(self):
        """Pickled as how to reopen the store and the index, never the ids (a Ray actor, a copied split)."""
        if self._reopen is None:
            return (TokenRows, (np.asarray(self._ids), np.asarray(self._offsets), self._index))
        fn, args = self._reopen
        return (_reopened, (fn, args, self._index))


def _reopened(fn, args: tuple, index: np.ndarray | None) -> TokenRows:
    view = fn(*args)
    return view if index is None else TokenRows(view._ids, view._offsets, index, view._reopen)


def row_lengths(ids: Sequence[Sequence[int]]) -> list[int]:
    """Each row's number of ids: read from a :class:`TokenRows`' offsets, counted for a list."""
    if isinstance(ids, TokenRows):
        return ids.lengths().tolist()
    return [len(s) for s in ids]
