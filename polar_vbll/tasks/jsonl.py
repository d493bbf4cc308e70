"""Users' own multiple-choice data: one JSON object per line (format in ``docs/data.md``).

Each line is ``{"question": str, "choices": [str, ...], "answer": int | "A".."Z" | choice text,
"context": str (optional), "id": str | int (optional)}``. Unknown keys are rejected, not ignored: a typo
such as ``"answers"`` or ``"contxt"`` would otherwise silently drop the label or the passage. Every error
is a ``DataError`` naming the file, the 1-based line number and the field. Blank lines are skipped.
"""

from __future__ import annotations

import difflib
import gzip
import json
import math
import numbers
import os
import string
from collections.abc import Callable, Iterator
from typing import Any

from polar_vbll.errors import DataError
from polar_vbll.tasks.example import MCExample, build_example, choice_problem, field_label

ALLOWED_KEYS = ("question", "choices", "answer", "context", "id")
#: The longest row accepted (bytes of one line): far beyond any prompt's token budget; a longer line is
#: refused, naming it, before it is parsed or tokenized (a 30 MB row once took 4.9 GB and two minutes).
MAX_ROW_BYTES = 1 << 20
REQUIRED_KEYS = ("question", "choices", "answer")
_BOM = b"\xef\xbb\xbf"


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a JSONL file")


def iter_json_lines(path: str) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, parsed_value)`` for every non-blank line of a JSONL file (``.gz`` is
    decompressed). Lines are decoded one by one so that bad bytes or bad JSON are reported with their line
    number; a UTF-8 byte-order mark on the first line is tolerated."""
    for lineno, value, _ in iter_json_lines_at(path):
        yield lineno, value


def iter_json_lines_at(path: str, offset: int = 0, first_line: int = 1) -> Iterator[tuple[int, Any, int]]:
    """:func:`iter_json_lines` with each line's byte offset, ``(line_number, parsed_value, offset)``,
    starting at byte ``offset`` of a plain (not gzipped) file, whose line number is ``first_line``: a
    chunk of a large file is read again from where a first pass found it (``polar_vbll.predict_io``)."""
    _check_file(path)
    gz = path.endswith(".gz")
    if gz and offset:
        raise ValueError("a gzipped file is read from its start")
    opener = gzip.open if gz else open
    try:
        with opener(path, "rb") as fh:
            fh.seek(offset)
            lineno, at = first_line - 1, offset
            while raw := fh.readline(MAX_ROW_BYTES + 1):
                lineno += 1
                start, at = at, at + len(raw)
                if len(raw) > MAX_ROW_BYTES:
                    raise DataError(
                        f"{path}, line {lineno}: longer than {MAX_ROW_BYTES:,} bytes, the limit of one row "
                        "(docs/data.md); shorten its passage or question"
                    )
                if lineno == 1 and raw.startswith(_BOM):
                    raw = raw[len(_BOM) :]
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(f"{path}, line {lineno}: not valid UTF-8 ({err.reason})") from None
                if not text.strip():
                    continue
                try:
                    yield lineno, json.loads(text), start
                except json.JSONDecodeError as err:
                    raise DataError(
                        f"{path}, line {lineno}: not valid JSON ({err.msg} at column {err.colno})"
                    ) from None
    except (OSError, EOFError) as err:  # unreadable file, truncated or corrupt gzip
        raise DataError(f"{path}: cannot be read ({err})") from None


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def resolve_answer(answer: str, choices: list[str]) -> int:
    """Map a string answer to a 0-based index: a single capital letter "A".."Z" is a label, anything else
    must equal one choice's text exactly. When a letter and a choice text would give different indices the
    row is ambiguous and refused (use an integer index there). Raises ``ValueError`` with the reason."""
    k = len(choices)
    letters = string.ascii_uppercase[:k]
    letter_index = (
        string.ascii_uppercase.index(answer)
        if len(answer) == 1 and answer.isascii() and answer.isupper()
        else None
    )
    text_matches = [i for i, choice in enumerate(choices) if choice == answer]
    if len(text_matches) > 1:
        raise ValueError(f"{answer!r} matches choices {text_matches}; use an integer index")
    if letter_index is not None and letter_index < k:
        if text_matches and text_matches[0] != letter_index:
            raise ValueError(
                f"{answer!r} is ambiguous: the letter means index {letter_index} but it is the text of "
                f"choice {text_matches[0]}; use an integer index"
            )
        return letter_index
    if text_matches:
        return text_matches[0]
    if letter_index is not None:
        raise ValueError(f"letter {answer!r} is outside the {k} choices (labels {letters[0]}..{letters[-1]})")
    close = difflib.get_close_matches(answer, choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"{answer!r} is neither a letter {letters[0]}..{letters[-1]} nor the exact text of a choice{hint}"
    )


def is_missing(value: object) -> bool:
    """An absent cell: ``None``, or a float NaN (how pandas and CSV readers write an empty cell)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def answer_index(answer: object) -> int | None:
    """An integer answer index from an int (numpy's too) or an integral float (``1.0``: pandas writes an
    integer column with a gap as floats); None for anything else (a bool is not an index)."""
    if isinstance(answer, bool) or type(answer).__name__ == "bool_":
        return None
    if isinstance(answer, numbers.Integral):
        return int(answer)
    if isinstance(answer, float) and math.isfinite(answer) and answer.is_integer():
        return int(answer)
    return None


def parse_row(
    row: Any, where: str, lineno: int, source: str, required: tuple[str, ...] = REQUIRED_KEYS, *,
    label: Callable[[str], str] = field_label, default_id: str = "line",
) -> MCExample:  # fmt: skip
    """Turn one parsed JSONL value into an ``MCExample`` (``where`` is "file, line n" for errors; the default
    id is ``line-<n>``, or ``<default_id>-<n>``). ``required``: the keys a row must have (a question to
    predict needs no answer: it is then 0, a placeholder the caller knows of). ``label`` names a field in
    errors (a table's reader names the column it came from). The one validation path of every reader:
    JSONL files, ``datasets`` sources, data frames and dicts given to the predictor."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {_type_name(row)}")
    unknown = [key for key in row if key not in ALLOWED_KEYS]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, ALLOWED_KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(f"{where}, {label(key)}: unknown key{hint}; allowed keys are {list(ALLOWED_KEYS)}")
    for key in required:
        if key not in row:
            optional = [k for k in ALLOWED_KEYS if k not in required]
            raise DataError(f"{where}, {label(key)}: missing (required: {list(required)}; optional: {optional})")
    if "answer" not in required and is_missing(row.get("answer")):
        row = {**row, "answer": 0}
    elif is_missing(row["answer"]):
        raise DataError(f"{where}, {label('answer')}: empty (null, or NaN: an empty cell); this row needs an answer")

    choices = row["choices"]
    if not isinstance(choices, list):
        raise DataError(f"{where}, {label('choices')}: must be a list of strings, got {_type_name(choices)}")

    answer = row["answer"]
    if isinstance(answer, str):
        # Resolve only once the choices are well-formed; otherwise let MCExample report the choices (a text
        # answer among duplicate choices is reported as the duplicates, which an index cannot fix either).
        if len(choices) >= 2 and all(isinstance(c, str) for c in choices):
            if (problem := choice_problem(choices)) is not None:
                raise DataError(f"{where}, {label(problem[0])}: {problem[1]}")
            try:
                answer = resolve_answer(answer, choices)
            except ValueError as err:
                raise DataError(f"{where}, {label('answer')}: {err}") from None
    elif (index := answer_index(answer)) is not None:
        answer = index
    elif isinstance(answer, float):
        raise DataError(
            f"{where}, {label('answer')}: must be an integer index (an integral float such as 1.0 is read as "
            f"1), a letter or a choice text, got {answer!r}, not a whole number"
        )
    else:
        raise DataError(
            f"{where}, {label('answer')}: must be an integer index, a letter or a choice text, got "
            f"{_type_name(answer)} {answer!r}"
        )

    context = row.get("context")
    if is_missing(context):
        context = None
    if context is not None and not isinstance(context, str):
        raise DataError(f"{where}, {label('context')}: must be a string, got {_type_name(context)}")
    if context is not None and not context.strip():
        context = None  # an empty context means "no context", as if the key were absent

    uid: object = row.get("id")
    if is_missing(uid):
        uid = f"{default_id}-{lineno}"
    elif (index := answer_index(uid)) is not None:
        uid = str(index)
    if not isinstance(uid, str) or not uid.strip():
        raise DataError(f"{where}, {label('id')}: must be a non-empty string or an integer, got {uid!r}")

    return build_example(
        where,
        label=label,
        uid=uid,
        question=row["question"],
        choices=choices,
        answer=answer,
        context=context,
        source=source,
    )


def note_unique_id(uid: str, lineno: int, where: str, first_line: dict[str, int]) -> None:
    """Record that ``uid`` is on line ``lineno`` in ``first_line``; raises ``DataError`` (``where``, field
    'id', the line it was first used on) for an id already used."""
    if uid in first_line:
        raise DataError(f"{where}, field 'id': {uid!r} is already used on line {first_line[uid]}; ids must be unique")
    first_line[uid] = lineno


def load_jsonl(path: str | os.PathLike[str], source: str | None = None) -> list[MCExample]:
    """Load a user's JSONL file into ``MCExample`` rows in file order. ``source`` defaults to
    ``jsonl:<path>``. Raises ``DataError`` (file, line, field) for any bad row, duplicate ids, or a file
    with no rows."""
    path = os.fspath(path)
    source = source or f"jsonl:{path}"
    examples: list[MCExample] = []
    first_line: dict[str, int] = {}
    for lineno, row in iter_json_lines(path):
        where = f"{path}, line {lineno}"
        example = parse_row(row, where, lineno, source)
        note_unique_id(example.uid, lineno, where, first_line)
        examples.append(example)
    if not examples:
        raise DataError(f"{path}: no rows (the file is empty or holds only blank lines)")
    return examples


#: The fields a question to predict must have (``answer`` is optional there: with it, the summary scores).
QUESTION_KEYS = ("question", "choices")


def parse_question_row(row: Any, where: str, lineno: int, source: str, **kw: Any) -> tuple[MCExample, bool]:
    """A row of a file of questions to predict (``polar-vbll predict``): the same fields as a training row
    (:func:`parse_row`) but ``answer`` optional. Returns the example (answer 0 when the row has none) and
    whether the row had an answer (``None`` or NaN is none). ``kw``: :func:`parse_row`'s ``label`` and
    ``default_id``. Raises ``DataError`` (file, line, field)."""
    has_answer = isinstance(row, dict) and not is_missing(row.get("answer"))
    return parse_row(row, where, lineno, source, required=QUESTION_KEYS, **kw), has_answer


def iter_questions(path: str | os.PathLike[str]) -> Iterator[tuple[int, MCExample, bool]]:
    """``(line, example, has_answer)`` for every row of a file of questions to predict, in file order,
    parsed one line at a time (a large file is never held in memory). Raises ``DataError``."""
    path = os.fspath(path)
    for lineno, row in iter_json_lines(path):
        example, has_answer = parse_question_row(row, f"{path}, line {lineno}", lineno, f"jsonl:{path}")
        yield lineno, example, has_answer
