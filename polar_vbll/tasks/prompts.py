"""The prompt template (method.md section 4) and the answer labels the classifier reads.

The model is asked for the *label* of the answer, and the class logits are read at the last prompt
position from the tokens in :func:`answer_token_strings` (" A", " B", ...: the token a model emits after
"Answer:"). Layout, with ``{...}`` filled in and ``\\n`` a newline::

    Return the label of the correct answer for the question below.\\n
    \\n
    Passage: {context}\\n          <- only when the example has a context
    Question: {question}\\n
    Choices:\\n
    A) {choice 0}\\n
    B) {choice 1}\\n
    ...
    Answer:

The prompt ends with "Answer:" (no trailing space), so the next token is the space-prefixed letter.

Over-long prompts (:func:`fit_prompt`): the instruction, "Question:", every choice label ("A) ", ...) and
"Answer:" always survive. What is shortened, in this order, until the prompt fits: the passage (cut at its
end), the choice texts (the longest first, each cut at its end), the question body (its start cut, so the
question itself, usually at the end, stays); each cut is marked with "...". A prompt that cannot fit even
then is refused, naming the example. ``TEMPLATE_VERSION`` changes whenever what a prompt holds changes; it is
recorded with every trained run.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from polar_vbll.errors import DataError
from polar_vbll.tasks.example import MAX_CHOICES, MCExample

INSTRUCTION = "Return the label of the correct answer for the question below."
CONTEXT_LABEL = "Passage: "
TRUNCATION_MARK = "..."
#: Version of what a prompt holds (the template and how over-long prompts are shortened).
TEMPLATE_VERSION = 2
#: The parts :func:`fit_prompt` may shorten, in the order it shortens them.
SHORTENABLE = ("passage", "choices", "question")

def answer_letters(k: int) -> list[str]:
    """The labels of ``k`` choices: ["A", "B", ...]. More than 26 choices cannot be labelled by a letter."""
    if k < 1:
        raise ValueError(f"need at least one choice, got k={k}")
    if k > MAX_CHOICES:
        raise DataError(f"{k} choices cannot be labelled A..Z: at most {MAX_CHOICES} are supported")
    return list(string.ascii_uppercase[:k])


def answer_token_strings(k: int) -> list[str]:
    """The strings whose token logits are the class logits: " A", " B", ... (the space is part of the token
    a model produces after "Answer:"). The caller maps each to a token id and checks it is a single token."""
    return [" " + letter for letter in answer_letters(k)]


def truncate_context(context: str, max_chars: int) -> str:
    """Cut ``context`` to at most ``max_chars`` characters, backing up to a word boundary and ending with
    "..." when it was cut: long BoolQ passages would otherwise push the question past the length limit."""
    if max_chars < len(TRUNCATION_MARK) + 1:
        raise ValueError(f"max_context_chars must be at least {len(TRUNCATION_MARK) + 1}, got {max_chars}")
    if len(context) <= max_chars:
        return context
    cut = context[: max_chars - len(TRUNCATION_MARK)]
    space = cut.rfind(" ")
    if space > len(cut) // 2:  # keep whole words unless that would throw away most of the budget
        cut = cut[:space]
    return cut.rstrip().rstrip(",;:").rstrip() + TRUNCATION_MARK


def render_prompt(context: str | None, question: str, choices: Sequence[str]) -> str:
    """The prompt for these texts (see the module docstring for the exact layout)."""
    letters = answer_letters(len(choices))
    lines = "".join(f"{letter}) {choice}\n" for letter, choice in zip(letters, choices, strict=True))
    passage = f"{CONTEXT_LABEL}{context}\n" if context is not None else ""
    return f"{INSTRUCTION}\n\n{passage}Question: {question}\nChoices:\n{lines}Answer:"


def format_prompt(example: MCExample, max_context_chars: int | None = None) -> str:
    """The full prompt for ``example``; ``max_context_chars`` shortens the passage with
    :func:`truncate_context`."""
    context = example.context
    if context is not None and max_context_chars is not None:
        context = truncate_context(context, max_context_chars)
    return render_prompt(context, example.question, example.choices)


def _head(text: str, n: int) -> str:
    """The first ``n`` characters of ``text`` (whole words when that keeps most of them) and "..."."""
    if n >= len(text):
        return text
    cut = text[:n]
    space = cut.rfind(" ")
    if space > n // 2:
        cut = cut[:space]
    return cut.rstrip().rstrip(",;:").rstrip() + TRUNCATION_MARK


def _tail(text: str, n: int) -> str:
    """"..." and the last ``n`` characters of ``text`` (from a word start when that keeps most of them)."""
    if n >= len(text):
        return text
    cut = text[len(text) - n :]
    space = cut.find(" ")
    if 0 <= space < n // 2:
        cut = cut[space + 1 :]
    return TRUNCATION_MARK + cut.lstrip()


def _longest(fits: Callable[[int], bool], hi: int) -> int:
    """The largest ``n`` in ``[0, hi]`` with ``fits(n)`` (bisection; ``fits`` grows with ``n``); 0 if none."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class FittedPrompt:
    """A prompt within its token budget, and which parts were shortened to get there (``SHORTENABLE``)."""

    text: str
    shortened: frozenset[str]


#: How far each part is shortened before the next one is touched: (part, characters kept at least). The
#: passage goes first and entirely; choice texts and the question keep a readable floor before the last
#: resort cuts them further.
_PHASES = (("passage", 0), ("choices", 40), ("question", 80), ("choices", 0), ("question", 0))


def fit_prompt(example: MCExample, count_tokens: Callable[[str], int], budget: int) -> FittedPrompt:
    """The prompt of ``example`` in at most ``budget`` tokens (``count_tokens(text)``): shortened as the
    module docstring says, never losing the question line, a choice label or "Answer:".

    Raises :class:`DataError` naming the example when even the shortest form does not fit."""
    parts: dict[str, object] = {
        "passage": example.context, "question": example.question, "choices": list(example.choices)
    }  # fmt: skip
    shortened: set[str] = set()
    # A part far longer than any budget is cut first (no token is longer than 16 characters in practice),
    # so the bisection below never tokenizes megabytes.
    cap = 16 * budget
    choices = list(example.choices)
    if any(len(c) > cap for c in choices):
        parts["choices"] = [_head(c, cap) for c in choices]
        shortened.add("choices")
    for part, cut in (("passage", _head), ("question", _tail)):
        value = parts[part]
        if isinstance(value, str) and len(value) > cap:
            parts[part] = cut(value, cap)
            shortened.add(part)
    full: dict[str, object] = dict(parts)

    def shortened_to(part: str, n: int) -> object:
        if part == "passage":
            return _head(full["passage"], n)  # type: ignore[arg-type]
        if part == "question":
            return _tail(full["question"], n)  # type: ignore[arg-type]
        return [_head(c, n) for c in full["choices"]]  # type: ignore[union-attr]

    def render(**change: object) -> str:
        p = {**parts, **change}
        return render_prompt(p["passage"], p["question"], p["choices"])  # type: ignore[arg-type]

    for part, floor in _PHASES:
        if count_tokens(render()) <= budget:
            break
        if full[part] is None:
            continue
        size = max(len(c) for c in full["choices"]) if part == "choices" else len(full[part])  # type: ignore
        if size <= floor:
            continue
        n = _longest(lambda n, part=part: count_tokens(render(**{part: shortened_to(part, n)})) <= budget, size)
        parts[part] = shortened_to(part, max(n, floor))
        shortened.add(part)
    text = render()
    if count_tokens(text) > budget:
        raise DataError(
            f"example {example.uid!r} ({example.source}): its prompt does not fit in {budget} tokens even with "
            f"the passage, every choice and the question shortened to {TRUNCATION_MARK!r} ({count_tokens(text)} "
            "tokens); raise model.max_length"
        )
    return FittedPrompt(text, frozenset(shortened))
