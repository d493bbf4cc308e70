"""The one record every task loader produces, and the one place its fields are validated.

Every source (the bundled benchmarks, a user's JSONL file) is turned into ``MCExample`` rows, so the
prompt builder, the splitter and the trainer never see source-specific shapes. Validation lives in
``MCExample.__post_init__`` alone; loaders catch :class:`ExampleFieldError` through
:func:`build_example` and re-raise it with the file and row, so a bad row is always reported as
"file, row, field: problem".
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class MCExample:
    """A K-way multiple-choice question.

    ``answer`` is the 0-based index of the correct entry of ``choices``; ``context`` is optional text shown
    before the question (a BoolQ passage); ``source`` names the task the row came from and ``uid`` is
    unique within that task, which is what the seeded splitter orders by.
    """

    uid: str
    question: str
    choices: tuple[str, ...]
    answer: int
    source: str
    context: str | None = None

    def __post_init__(self) -> None:
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


def build_example(where: str, **fields: object) -> MCExample:
    """Build an ``MCExample``, re-raising a field error as a ``DataError`` prefixed with ``where`` (the file
    and row), so every loader reports bad rows the same way."""
    try:
        return MCExample(**fields)  # type: ignore[arg-type]
    except ExampleFieldError as err:
        raise DataError(f"{where}, field '{err.field}': {err.problem}") from None


def num_classes(examples: list[MCExample] | tuple[MCExample, ...]) -> int:
    """The classifier width for a dataset: the largest number of choices of any example (questions with
    fewer choices are masked by the caller)."""
    if not examples:
        raise DataError("no examples: cannot determine the number of classes of an empty dataset")
    return max(ex.num_choices for ex in examples)
