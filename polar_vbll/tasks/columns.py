"""Tables of questions: a column mapping onto our row format, and rows of any table into ``MCExample``s.

A table (a ``datasets`` split, a pandas DataFrame, a pyarrow Table, a list of dicts) names its columns its own
way. ``data.columns`` (or a ``columns=`` argument) maps our fields to them::

    {"question": "text", "choices": "options", "answer": "label", "context": "passage", "id": "uid"}
    {"question": "q", "choices": ["opt_a", "opt_b", "opt_c"], "answer": "gold"}  # choices from several columns

A field the mapping leaves out is read from the column of its own name, when the table has one. Other
columns are ignored (datasets carry ``idx``, ``subject``, ...), except one that looks like a misspelt field
(``answers``, ``contxt``), which is refused with the mapping that would read it. Each row becomes our JSONL
row and goes through the JSONL reader's one validation path (:func:`polar_vbll.tasks.jsonl.parse_row`), so
labels are an index (an integral float too), a letter or a choice text, exactly as in a JSONL file, and
every error is one line naming the source, the row and the column.

Standard library only: the caller turns its table into ``(column names, rows as dicts)``.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from polar_vbll.errors import DataError
from polar_vbll.tasks.example import MCExample
from polar_vbll.tasks.jsonl import ALLOWED_KEYS, QUESTION_KEYS, REQUIRED_KEYS, is_missing, parse_row

#: Our fields, in the order errors list them.
FIELDS = ALLOWED_KEYS
#: How close (difflib ratio) an unread column must be to a field's name to be taken for a misspelling of it.
_TYPO_CUTOFF = 0.85

ColumnMapping = Mapping[str, "str | Sequence[str]"]


def check_mapping(columns: Mapping[str, Any] | None, what: str = "data.columns") -> dict[str, str | list[str]]:
    """The mapping, checked for its own shape (not against a table): keys among our fields, each value one
    column name, and ``choices`` one name or a list of at least 2 distinct names. Raises ``ValueError``
    (one line naming ``what`` and the key; the config reports it as a ``ConfigError``)."""
    if columns is None:
        return {}
    if not isinstance(columns, Mapping):
        raise ValueError(f"{what} must be a mapping of our fields to columns, e.g. {{question: text}}")
    out: dict[str, str | list[str]] = {}
    for key, value in columns.items():
        if key not in FIELDS:
            close = difflib.get_close_matches(str(key), FIELDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{what}: {key!r} is not one of our fields{hint}; they are {list(FIELDS)}")
        if key == "choices" and isinstance(value, (list, tuple)):
            names = list(value)
            if len(names) < 2 or not all(isinstance(n, str) and n for n in names):
                raise ValueError(f"{what}.choices: a list must name at least 2 columns, got {names!r}")
            if len(set(names)) != len(names):
                raise ValueError(f"{what}.choices: a column is named twice in {names!r}")
            out[key] = names
        elif isinstance(value, str) and value:
            out[key] = value
        else:
            kind = "a column name or a list of column names" if key == "choices" else "a column name"
            raise ValueError(f"{what}.{key}: must be {kind}, got {value!r}")
    return out


@dataclass(frozen=True)
class Resolved:
    """A mapping resolved against one table's columns: ``read[field]`` is the column (for ``choices``
    maybe a list of columns) each present field is read from; ``ignored`` the columns nothing reads."""

    read: dict[str, str | tuple[str, ...]]
    ignored: tuple[str, ...]

    def label(self, field: str) -> str:
        """How an error names ``field`` (``answer``, ``choices[1]``, ...): by the column it was read from."""
        base, bracket, rest = field.partition("[")
        col = self.read.get(base)
        if col is None:
            return f"field '{field}'"
        if isinstance(col, tuple):
            if not bracket:
                return f"columns {list(col)} ({base})"
            i = int(rest.rstrip("]"))
            return f"column '{col[i]}' ({field})" if i < len(col) else f"field '{field}'"
        return f"column '{col}'{bracket}{rest}" + ("" if col == base else f" ({base})")

    def row(self, cells: Mapping[str, Any]) -> dict[str, Any]:
        """One table row as our JSONL row (``parse_row``'s input): choices gathered, empty cells dropped,
        numpy values made plain Python."""
        out: dict[str, Any] = {}
        for field, col in self.read.items():
            if field == "choices":
                if isinstance(col, tuple):
                    values = [_plain(cells.get(c)) for c in col]
                    while values and (is_missing(values[-1]) or values[-1] == ""):
                        values.pop()  # a question with fewer choices leaves the last columns empty
                else:
                    values = _plain(cells.get(col))
                out[field] = [_choice_text(v) for v in values] if isinstance(values, list) else values
            else:
                value = _plain(cells.get(col))
                if not (field in ("context", "id") and is_missing(value)):
                    out[field] = value
        return out


def resolve(
    columns: ColumnMapping | None, available: Sequence[str], source: str, *,
    required: Sequence[str] = REQUIRED_KEYS, strict: bool = True, what: str = "data.columns",
) -> Resolved:  # fmt: skip
    """Resolve ``columns`` against a table's ``available`` columns. ``strict``: a mapped column must exist
    (a config's mapping); otherwise (a run's recorded mapping applied to new questions) a field whose mapped
    column is absent is read from the column of its own name, or (an optional field) not at all. Raises
    ``DataError`` (one line: the source, the column, the columns available and the closest one)."""
    mapping = check_mapping(columns, what)
    have = list(available)
    read: dict[str, str | tuple[str, ...]] = {}
    for field in FIELDS:
        col = mapping.get(field)
        cols = tuple(col) if isinstance(col, list) else (col,) if col is not None else ()
        missing_cols = [c for c in cols if c not in have]
        if cols and not missing_cols:
            read[field] = cols if isinstance(col, list) else cols[0]
        elif cols and (strict or (field not in have and field in required)):
            raise DataError(f"{source}, column {missing_cols[0]!r} ({what}.{field}): no such column; "
                            + _available(missing_cols[0], have))  # fmt: skip
        elif field in have:
            read[field] = field
        elif field in required:
            raise DataError(
                f"{source}: no column for {field!r}; map one with {what}.{field} (e.g. {{{field}: <column>}}); "
                + _available(field, have)
            )
    used = {c for v in read.values() for c in (v if isinstance(v, tuple) else (v,))}
    ignored = tuple(c for c in have if c not in used)
    for col in ignored:  # an unread column named almost like an unread field is a typo, not extra data
        close = difflib.get_close_matches(col, [f for f in FIELDS if f not in read], n=1, cutoff=_TYPO_CUTOFF)
        if close:
            raise DataError(
                f"{source}, column {col!r}: not read, but named like the field {close[0]!r}; map it "
                f"({what}: {{{close[0]}: {col}}}) or rename it"
            )
    return Resolved(read, ignored)


def _available(name: str, have: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, have, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"the columns are {list(have)}{hint}"


def _plain(value: Any) -> Any:
    """numpy scalars and arrays (pandas cells, Arrow lists read through pandas) as plain Python."""
    if isinstance(value, (str, bytes, bool, int, float)) or value is None:
        return value
    if hasattr(value, "tolist") and not isinstance(value, Mapping):
        return value.tolist()  # a numpy array or scalar
    if isinstance(value, tuple):
        return list(value)
    return value


def _choice_text(value: Any) -> Any:
    """A number in a choices column is its decimal text (a CSV reader types ``4`` as a number; ``2.5``
    stays ``'2.5'``); anything else is passed on for the row's validation to judge."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return value


def examples_from_rows(
    rows: Iterable[Mapping[str, Any]], resolved: Resolved, source: str, where: str, *,
    questions: bool = False, unique: bool = True, at_row: Callable[[int], str] | None = None,
) -> Iterator[tuple[int, MCExample, bool]]:  # fmt: skip
    """``(row, example, has_answer)`` for every row (1-based), through :func:`parse_row`; errors name
    ``where`` (the file or source), the row and the column. ``questions``: rows to predict (``answer``
    optional); ``unique``: ids must not repeat (training data); ``at_row``: how errors name the row at a
    1-based position (default ``<where>, row <n>``)."""
    from polar_vbll.tasks.jsonl import parse_question_row

    first: dict[str, int] = {}
    for i, cells in enumerate(rows, start=1):
        at = at_row(i) if at_row is not None else f"{where}, row {i}"
        row = resolved.row(cells)
        if questions:
            example, has = parse_question_row(row, at, i, source, label=resolved.label, default_id="row")
        else:
            example, has = parse_row(row, at, i, source, REQUIRED_KEYS, label=resolved.label, default_id="row"), True
        if unique:
            if example.uid in first:
                again = at_row(first[example.uid]) if at_row is not None else f"row {first[example.uid]}"
                raise DataError(f"{at}, {resolved.label('id')}: {example.uid!r} is already used ({again}); "
                                "ids must be unique")  # fmt: skip
            first[example.uid] = i
        yield i, example, has


__all__ = ["FIELDS", "QUESTION_KEYS", "Resolved", "check_mapping", "examples_from_rows", "resolve"]
