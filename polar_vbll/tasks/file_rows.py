"""A user's JSONL file read once, checked, and then held as a few columns, not as examples.

:func:`scan_jsonl` reads a plain (not gzipped) JSONL file in one streaming pass through the one row
validation (``jsonl.parse_row``: file, line and field in every error; duplicate ids refused as
``load_jsonl`` refuses them) and keeps, per row, only what a run needs without the text: its id, answer,
number of choices, line number and byte offset. :class:`FileSplit` is a view of those rows (all of them in
file order, or a seeded split's rows in its order) that reads like the ``list[MCExample]`` of
``load_jsonl``: ``len``, ``split[i]`` (the row read back from the file), iteration, slicing (a view). Its
columns (``uids``, ``answers``, ``n_choices``) answer the questions a run asks of a whole split without
reading the file again; ``polar_vbll.token_file`` tokenises it in chunks into a memory-mapped cache.

A 100,000-row file costs about 10 MB of columns here (ids as strings, the rest numpy), where its examples
took several hundred MB.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from polar_vbll.errors import DataError
from polar_vbll.files import sha256_file
from polar_vbll.tasks.example import MCExample
from polar_vbll.tasks.jsonl import iter_json_lines_at, note_unique_id, parse_row


@dataclass(frozen=True, eq=False)
class ScannedFile:
    """The checked columns of one JSONL file, row ``r`` being its ``r``-th non-blank line. ``uids``: the
    rows' ids (``line-<n>`` where a row has none); ``answers``, ``n_choices``: ``(N,)`` int64; ``lines``:
    ``(N,)`` int64 1-based line numbers; ``offsets``: ``(N,)`` int64 byte offsets of the lines; ``stat``:
    (size, mtime_ns, inode) when scanned; ``sha256``: of the file's bytes (hex); ``source``: the task name
    the rows carry (``jsonl:<path>``)."""

    path: str
    source: str
    uids: list[str]
    answers: np.ndarray
    n_choices: np.ndarray
    lines: np.ndarray
    offsets: np.ndarray
    stat: tuple[int, int, int]
    sha256: str

    def __len__(self) -> int:
        return len(self.uids)

    def read(self, rows: Sequence[int] | np.ndarray) -> Iterator[MCExample]:
        """The examples of rows ``rows`` (store positions), in that order, read back from the file (one
        handle; each row parsed through ``parse_row`` again). Raises ``DataError`` if the file changed."""
        self.check_unchanged()
        with open(self.path, "rb") as fh:
            for r in rows:
                r = int(r)
                fh.seek(int(self.offsets[r]))
                raw = fh.readline()
                lineno = int(self.lines[r])
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                where = f"{self.path}, line {lineno}"
                try:
                    row = json.loads(raw.decode("utf-8"))
                except ValueError as err:
                    raise DataError(f"{where}: changed since it was checked ({err})") from None
                yield parse_row(row, where, lineno, self.source)

    def check_unchanged(self) -> None:
        """Raise ``DataError`` when the file is not the one scanned (its size, time or inode changed)."""
        if _stat(self.path) != self.stat:
            raise DataError(f"{self.path}: changed while the run read it; start the run again")


def _stat(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ino)


_SCANS: dict[tuple[str, str], ScannedFile] = {}
_KEEP = 4  # scans kept per process: a run reads one file for three splits (and the task's width), or a folder of three


def scan_jsonl(path: str | os.PathLike[str], source: str | None = None) -> ScannedFile:
    """Check every row of a plain JSONL file in one streaming pass and keep its columns (module docstring).
    Raises ``DataError`` as ``load_jsonl`` does (file, line, field; duplicate ids; no rows). A process keeps
    the last scans and reuses one while the file's size, modification time, inode and sha256 are unchanged
    (hashing 20 MB takes about 40 ms; a scan of 100,000 rows seconds)."""
    path = os.fspath(path)
    source = source or f"jsonl:{path}"
    memo = _SCANS.get((path, source))
    if memo is not None and os.path.isfile(path) and _stat(path) == memo.stat and sha256_file(path) == memo.sha256:
        return memo
    uids: list[str] = []
    answers: list[int] = []
    n_choices: list[int] = []
    lines: list[int] = []
    offsets: list[int] = []
    first_line: dict[str, int] = {}
    stat, sha = (_stat(path), sha256_file(path)) if os.path.isfile(path) else ((0, 0, 0), "")
    for lineno, row, at in iter_json_lines_at(path):
        where = f"{path}, line {lineno}"
        example = parse_row(row, where, lineno, source)
        note_unique_id(example.uid, lineno, where, first_line)
        uids.append(example.uid)
        answers.append(example.answer)
        n_choices.append(example.num_choices)
        lines.append(lineno)
        offsets.append(at)
    if not uids:
        raise DataError(f"{path}: no rows (the file is empty or holds only blank lines)")
    scan = ScannedFile(path, source, uids, np.array(answers, dtype=np.int64), np.array(n_choices, dtype=np.int64),
                       np.array(lines, dtype=np.int64), np.array(offsets, dtype=np.int64), stat, sha)  # fmt: skip
    while len(_SCANS) >= _KEEP:
        _SCANS.pop(next(iter(_SCANS)))
    _SCANS[(path, source)] = scan
    return scan


class FileSplit(Sequence):
    """Rows ``index`` of a :class:`ScannedFile`, in that order: a ``Sequence[MCExample]`` whose items are
    read back from the file when asked for (module docstring). ``index``: ``(n,)`` int64 store rows."""

    def __init__(self, scan: ScannedFile, index: np.ndarray | None = None) -> None:
        self.scan = scan
        self.index = np.arange(len(scan), dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):  # type: ignore[override]
        """``split[i]``: the example (read from the file); ``split[a:b]``: a view of those rows."""
        if isinstance(i, slice):
            return FileSplit(self.scan, self.index[i])
        return next(self.scan.read([self.index[i]]))

    def __iter__(self) -> Iterator[MCExample]:
        return self.scan.read(self.index)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FileSplit) and other.scan is self.scan:
            return np.array_equal(self.index, other.index)
        if isinstance(other, (FileSplit, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"FileSplit({self.scan.path!r}, {len(self)} rows)"

    def select(self, positions: Sequence[int] | np.ndarray) -> FileSplit:
        """A view of this view's rows at ``positions``, in that order."""
        return FileSplit(self.scan, self.index[np.asarray(positions, dtype=np.int64)])

    @property
    def uids(self) -> list[str]:
        """The rows' ids, in this view's order."""
        return [self.scan.uids[r] for r in self.index]

    @property
    def answers(self) -> np.ndarray:
        """``(n,)`` int64: the answer index of each row."""
        return self.scan.answers[self.index]

    @property
    def n_choices(self) -> np.ndarray:
        """``(n,)`` int64: the number of choices of each row."""
        return self.scan.n_choices[self.index]

    def max_choices(self) -> int:
        """The most choices of any row (``num_classes`` without reading the rows); 0 for no rows."""
        return int(self.n_choices.max()) if len(self) else 0
