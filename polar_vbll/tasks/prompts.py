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
"""

from __future__ import annotations

import string
from typing import NamedTuple

from polar_vbll.errors import DataError
from polar_vbll.tasks.example import MAX_CHOICES, MCExample

INSTRUCTION = "Return the label of the correct answer for the question below."
CONTEXT_LABEL = "Passage: "
TRUNCATION_MARK = "..."


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


class PromptParts(NamedTuple):
    """A prompt cut around its context, so a tokenizer-stage truncation can shorten the passage alone and
    keep the question, the choices and the trailing "Answer:". ``prefix + context + suffix`` is the prompt;
    ``context`` is "" when the example has none."""

    prefix: str
    context: str
    suffix: str


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


def prompt_parts(example: MCExample, max_context_chars: int | None = None) -> PromptParts:
    """The prompt of ``example`` split into (prefix, context, suffix); see the module docstring for the
    layout. ``max_context_chars`` shortens the context with :func:`truncate_context`."""
    letters = answer_letters(example.num_choices)
    choice_lines = "".join(
        f"{letter}) {choice}\n" for letter, choice in zip(letters, example.choices, strict=True)
    )
    suffix = f"Question: {example.question}\nChoices:\n{choice_lines}Answer:"
    if example.context is None:
        return PromptParts(f"{INSTRUCTION}\n\n", "", suffix)
    context = example.context
    if max_context_chars is not None:
        context = truncate_context(context, max_context_chars)
    return PromptParts(f"{INSTRUCTION}\n\n{CONTEXT_LABEL}", context, "\n" + suffix)


def format_prompt(example: MCExample, max_context_chars: int | None = None) -> str:
    """The full prompt for ``example`` (see the module docstring for the exact layout)."""
    return "".join(prompt_parts(example, max_context_chars))
