"""The one record every task loader produces, and the one place its fields are validated.

Every source (the bundled benchmarks, a user's JSONL file, questions to predict or calibrate on, an
``MCExample`` built in Python) is turned into ``MCExample`` rows, so the prompt builder, the splitter and
the trainer never see source-specific shapes. Validation lives in ``MCExample.__post_init__`` alone;
loaders catch :class:`ExampleFieldError` through :func:`build_example` and re-raise it with the file and
row, so a bad row is always reported as "file, row, field: problem".

Beyond the types, a question must be able to mean what it says (:func:`choice_problem`, docs/data.md):
no choice holds a control character or a line break (a newline in ``"yes\nC) maybe"`` renders a phantom
label ``C)`` into the prompt's list), and no two choices are the same text. The shipped benchmarks hold a
few such questions; they are built with ``shipped=True`` and warned about by their reader instead.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import InitVar, dataclass

from polar_vbll.errors import DataError

#: Answer labels are the letters A..Z, so a question can have at most 26 choices.
MAX_CHOICES = 26


class ExampleFieldError(DataError):
    """One field of an example is invalid. Carries ``field`` and ``problem`` so a loader can prefix the
    file and row without parsing the message."""

    def __init__(self, field: str, problem: str, uid: str | None = None):
        self.field = field
        self.problem = problem
        self.uid = uid
        where = f"example {uid!r}, " if uid else ""
        super().__init__(f"{where}field '{field}': {problem}")


def _is_nonempty_str(value: object) -> bool:
    return isinstance(value, str) and value.strip() != ""


#: Unicode categories a choice may not hold: control characters (Cc: C0 U+0000-U+001F, DEL, C1
#: U+0080-U+009F; newline, carriage return and tab among them) and the line and paragraph separators
#: (Zl U+2028, Zp U+2029), which some tokenizers and viewers treat as line breaks.
_REFUSED_CATEGORIES = ("Cc", "Zl", "Zp")
_LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines() splits on


def choice_key(text: str) -> str:
    """The text two choices are compared by for duplicates: Unicode NFKC (a no-break space or a full-width
    letter becomes its plain form), whitespace runs collapsed to one space, ends stripped. Case counts:
    ``Rr`` and ``rr`` (genotypes), ``II`` and ``ii`` are different answers in the shipped benchmarks."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def choice_problem(choices: tuple[str, ...] | list[str]) -> tuple[str, str] | None:
    """``(field, problem)`` for the first choice that cannot be shown or told apart as it is, else None:
    a control character or line break in a choice (it corrupts the prompt's ``A) ... B) ...`` layout, or
    is invisible in it), or two choices with the same text (:func:`choice_key`), of which the question
    cannot say which one is right. The one rule every reader applies (``MCExample``; the shipped
    benchmarks warn instead, docs/data.md). ``choices``: strings."""
    for i, choice in enumerate(choices):
        for at, ch in enumerate(choice):
            if unicodedata.category(ch) in _REFUSED_CATEGORIES:
                where = f"choice {_label(i)} holds {{}} (U+{ord(ch):04X}) at character {at + 1}: {_clip(choice)}"
                if ch in _LINE_BREAKS:
                    return f"choices[{i}]", where.format("a line break") + (
                        "; the prompt lists one choice per line, so the text after the break would read as a "
                        "new line of the list (a phantom label such as 'C) ...'); put the choice on one line"
                    )
                return f"choices[{i}]", where.format("a control character") + (
                    "; it is invisible in the prompt or moves its text; remove it"
                )
    first: dict[str, int] = {}
    for i, choice in enumerate(choices):
        key = choice_key(choice)
        if key in first:
            j = first[key]
            return "choices", (
                f"choices {_label(j)} and {_label(i)} are the same text {_clip(choice)} (compared after "
                "Unicode NFKC and collapsing whitespace; case counts): the question cannot say which of the "
                "two is right; remove or reword one"
            )
        first[key] = i
    return None


def _label(i: int) -> str:
    return chr(ord("A") + i) if i < MAX_CHOICES else str(i)


def _clip(text: str, width: int = 60) -> str:
    return repr(text if len(text) <= width else text[: width - 3] + "...")


@dataclass(frozen=True)
class MCExample:
    """A K-way multiple-choice question.

    ``answer`` is the 0-based index of the correct entry of ``choices``; ``context`` is optional text shown
    before the question (a BoolQ passage); ``source`` names the task the row came from and ``uid`` is
    unique within that task, which is what the seeded splitter orders by. ``shipped`` (not stored): the
    row comes from a shipped benchmark, whose choices are passed through as published even where
    :func:`choice_problem` objects (its reader warns); every other row is refused there.
    """

    uid: str
    question: str
    choices: tuple[str, ...]
    answer: int
    source: str
    context: str | None = None
    shipped: InitVar[bool] = False

    def __post_init__(self, shipped: bool) -> None:
        # Accept a list for convenience but store a tuple, so the frozen example is truly immutable.
        if isinstance(self.choices, list):
            object.__setattr__(self, "choices", tuple(self.choices))
        uid = self.uid if isinstance(self.uid, str) else None
        if not _is_nonempty_str(self.uid):
            raise ExampleFieldError("id", f"must be a non-empty string, got {self.uid!r}")
        if not isinstance(self.source, str) or not self.source:
            raise ExampleFieldError("source", f"must be a non-empty string, got {self.source!r}", uid)
        if not isinstance(self.question, str):
            raise ExampleFieldError("question", f"must be a string, got {type(self.question).__name__}", uid)
        if not self.question.strip():
            raise ExampleFieldError("question", "is empty", uid)
        if not isinstance(self.choices, tuple):
            raise ExampleFieldError(
                "choices", f"must be a list of strings, got {type(self.choices).__name__}", uid
            )
        if len(self.choices) < 2:
            raise ExampleFieldError("choices", f"needs at least 2 choices, got {len(self.choices)}", uid)
        if len(self.choices) > MAX_CHOICES:
            raise ExampleFieldError(
                "choices",
                f"has {len(self.choices)} choices; at most {MAX_CHOICES} are supported (labels A..Z)",
                uid,
            )
        for i, choice in enumerate(self.choices):
            if not isinstance(choice, str):
                raise ExampleFieldError(
                    f"choices[{i}]", f"must be a string, got {type(choice).__name__}", uid
                )
            if not choice.strip():
                raise ExampleFieldError(f"choices[{i}]", "is empty", uid)
        if not shipped and (problem := choice_problem(self.choices)) is not None:
            raise ExampleFieldError(*problem, uid)
        # bool is an int subclass; True as an answer index is almost certainly a data bug.
        if not isinstance(self.answer, int) or isinstance(self.answer, bool):
            raise ExampleFieldError("answer", f"must be an integer index, got {self.answer!r}", uid)
        if not 0 <= self.answer < len(self.choices):
            raise ExampleFieldError(
                "answer",
                f"index {self.answer} is outside the {len(self.choices)} choices "
                f"(0-based: 0..{len(self.choices) - 1})",
                uid,
            )
        if self.context is not None and not _is_nonempty_str(self.context):
            raise ExampleFieldError(
                "context", f"must be a non-empty string or absent, got {self.context!r}", uid
            )

    @property
    def num_choices(self) -> int:
        """K for this question (questions within one task may differ, e.g. ARC has 3 to 5)."""
        return len(self.choices)


def field_label(field: str) -> str:
    """How an error names one of our fields: ``field 'answer'`` (a table's reader names its column instead,
    ``polar_vbll.tasks.columns``)."""
    return f"field '{field}'"


def build_example(where: str, *, label: Callable[[str], str] = field_label, **fields: object) -> MCExample:
    """Build an ``MCExample``, re-raising a field error as a ``DataError`` prefixed with ``where`` (the file
    and row) and the field as ``label`` names it, so every loader reports bad rows the same way."""
    try:
        return MCExample(**fields)  # type: ignore[arg-type]
    except ExampleFieldError as err:
        raise DataError(f"{where}, {label(err.field)}: {err.problem}") from None


def build_shipped_example(where: str, notes: list[str], **fields: object) -> MCExample:
    """:func:`build_example` for a row of a shipped benchmark: its choices are kept as published where
    :func:`choice_problem` objects, and the problem is appended to ``notes`` (``where, field: problem``)
    for the reader's one warning per file."""
    example = build_example(where, shipped=True, **fields)
    if (problem := choice_problem(example.choices)) is not None:
        notes.append(f"{where}, field '{problem[0]}': {problem[1]}")
    return example


def num_classes(examples: Sequence[MCExample]) -> int:
    """The classifier width for a dataset: the largest number of choices of any example (questions with
    fewer choices are masked by the caller)."""
    if not examples:
        raise DataError("no examples: cannot determine the number of classes of an empty dataset")
    if hasattr(examples, "max_choices"):  # a file's rows (tasks.file_rows.FileSplit): from its columns
        return examples.max_choices()  # type: ignore[union-attr]
    return max(ex.num_choices for ex in examples)
