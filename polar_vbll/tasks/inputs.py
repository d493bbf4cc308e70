"""Questions as a user hands them to the predictor (``Predictor.predict`` / ``predictive`` / ``calibrate``,
``polar-vbll predict --input``): one reader for every shape, each row through the JSONL reader's validation.

Accepted (docs/predict.md):

- a source name: ``jsonl:<file>`` or a plain path (JSONL, our row format), ``csv:``, ``parquet:``, ``json:``
  (one file) and ``hf:<folder | org/name>[:config]`` (``split`` picks one of several);
- a list (any sequence) of ``MCExample`` rows and dicts (our JSONL row format; with a column mapping, the
  source's column names);
- a pandas ``DataFrame``, a pyarrow ``Table``, a ``datasets.Dataset`` (columns through the mapping).

The mapping is ``columns`` when given (every mapped column must exist) or else the run's own ``data.columns``
(a field whose mapped column is absent is then read from the column of its own name, so rows in our format
work too). Dicts with no mapping at all are JSONL rows: an unknown key is refused, as in a file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from polar_vbll.errors import DataError, UserInputError
from polar_vbll.tasks import hf_source
from polar_vbll.tasks.columns import examples_from_rows, resolve
from polar_vbll.tasks.example import MCExample
from polar_vbll.tasks.jsonl import (
    QUESTION_KEYS,
    REQUIRED_KEYS,
    iter_json_lines,
    parse_question_row,
    parse_row,
)


@dataclass(frozen=True)
class Item:
    """One question read: the example (answer 0 as a placeholder when the row has none), whether the row
    had an answer, and where it was (``line``/``row`` of a file or source, 1-based; None from a Python
    list or frame)."""

    example: MCExample
    has_answer: bool
    line: int | None = None
    line_kind: str = "line"


def read_items(
    data: Any, *, columns: Mapping[str, Any] | None = None, run_columns: Mapping[str, Any] | None = None,
    split: str | None = None, answers: bool = False, what: str = "question",
) -> list[Item]:  # fmt: skip
    """Every question of ``data`` (the shapes of the module docstring), checked, in order. ``answers``: each
    row must have an answer (calibration). ``what`` names a list's rows in errors (``question 3``). Raises
    ``DataError`` (one line: where, row, column or field) or ``UserInputError`` (an input of no known
    shape, an empty one)."""
    if columns is not None:
        mapping, strict = columns, True
    else:
        mapping, strict = run_columns or None, False
    required = REQUIRED_KEYS if answers else QUESTION_KEYS
    if isinstance(data, (str, os.PathLike)):
        items = _from_source(os.fspath(data), mapping, strict, split, answers)
    elif isinstance(data, Mapping):
        raise UserInputError(
            "give the questions as a list of dicts (one per question), a DataFrame or a table, not one mapping"
        )
    elif _is_frame(data):
        labels = list(data.index)
        cols = [str(c) for c in data.columns]
        rows = data.to_dict(orient="records")
        items = _table(rows, cols, mapping, strict, required, "the DataFrame", answers,
                       lambda i: f"the DataFrame, index {labels[i - 1]!r}")  # fmt: skip
    elif _is_arrow(data) or _is_dataset(data):
        table = data.flatten()
        kind = "the Table" if _is_arrow(data) else "the Dataset"
        items = _table(table.to_pylist() if _is_arrow(data) else table.to_list(), list(table.column_names),
                       mapping, strict, required, kind, answers, lambda i: f"{kind}, row {i - 1}")  # fmt: skip
    elif isinstance(data, Sequence) and not isinstance(data, (bytes, bytearray)):
        items = _from_list(list(data), mapping, strict, required, answers, what)
    else:
        raise UserInputError(
            f"cannot read questions from a {type(data).__name__}: give a list of dicts or MCExamples, a pandas "
            "DataFrame, a pyarrow Table, a datasets.Dataset, or a source (a JSONL path, csv:, parquet:, json:, hf:)"
        )
    if not items:
        where = os.fspath(data) if isinstance(data, (str, os.PathLike)) else None
        raise UserInputError(f"{where}: no questions (the file is empty or holds only blank lines)" if where
                             else "no questions given")  # fmt: skip
    return items


def _is_frame(data: Any) -> bool:
    return type(data).__name__ == "DataFrame" and hasattr(data, "to_dict") and hasattr(data, "columns")


def _is_arrow(data: Any) -> bool:
    return type(data).__module__.startswith("pyarrow") and type(data).__name__ == "Table"


def _is_dataset(data: Any) -> bool:
    return type(data).__module__.startswith("datasets") and type(data).__name__ == "Dataset"


def _table(rows, cols, mapping, strict, required, where, answers, at_row) -> list[Item]:
    resolved = resolve(mapping, cols, where, required=required, strict=strict,
                       what="columns" if strict else "the run's data.columns")  # fmt: skip
    out = []
    for _, example, has in examples_from_rows(rows, resolved, "predict", where, questions=not answers, unique=False,
                                              at_row=at_row):  # fmt: skip
        out.append(Item(example, has))
    return out


def _from_list(rows: list, mapping, strict, required, answers, what) -> list[Item]:
    dicts = [r for r in rows if not isinstance(r, MCExample)]
    for i, r in enumerate(rows):
        if not isinstance(r, (MCExample, Mapping)):
            raise DataError(f"{what} {i}: expected a dict or an MCExample, got {type(r).__name__}")
    resolved = None
    if mapping and dicts:
        cols: dict[str, None] = {}
        for r in dicts:
            cols.update(dict.fromkeys(str(k) for k in r))
        resolved = resolve(mapping, list(cols), f"the {what}s", required=required, strict=strict,
                           what="columns" if strict else "the run's data.columns")  # fmt: skip
    out = []
    for i, r in enumerate(rows):
        if isinstance(r, MCExample):
            out.append(Item(r, True))
            continue
        at = f"{what} {i}"
        if resolved is None:
            row, label = dict(r), None
        else:
            row, label = resolved.row(r), resolved.label
        kw = {"label": label} if label is not None else {}
        if answers:
            out.append(Item(parse_row(row, at, i + 1, "api", **kw), True))
        else:
            example, has = parse_question_row(row, at, i + 1, "predict", **kw)
            out.append(Item(example, has))
    return out


def _from_source(name: str, mapping, strict, split, answers) -> list[Item]:
    if hf_source.is_source(name):
        where, resolved, rows = hf_source.question_rows(name, split, mapping, strict, answers)
        return [Item(e, has, i, "row") for i, e, has in
                examples_from_rows(rows, resolved, name, where, questions=not answers, unique=False)]  # fmt: skip
    path = name[len("jsonl:") :] if name.startswith("jsonl:") else name
    if split is not None:
        raise UserInputError(f"{name}: a JSONL file has no splits (split={split!r})")
    path = os.path.expanduser(path)
    out = []
    for lineno, row in iter_json_lines(path):
        at = f"{path}, line {lineno}"
        if answers:
            out.append(Item(parse_row(row, at, lineno, f"jsonl:{path}"), True, lineno))
        else:
            example, has = parse_question_row(row, at, lineno, f"jsonl:{path}")
            out.append(Item(example, has, lineno))
    return out


def source_path(name: str) -> str | None:
    """The local file a source name reads (for ``--output``'s check that it is not the input), or None."""
    if hf_source.is_source(name):
        src = hf_source.parse_source(name)
        return os.path.expanduser(src.target) if src.local else None
    return os.path.expanduser(name[len("jsonl:") :] if name.startswith("jsonl:") else name)
