"""How a run reads its class logits, saved beside its head so that a reload never re-derives it.

``readout.json`` in a run folder records the prompt template version, the number of answer letters ``K``
(the head's width: the task's widest question, OOD sets included), the letters and their token ids, and the
tokenizer settings (max length, BOS, padding side). ``polar-vbll eval`` builds the head from it, checks that
the tokenizer still maps the letters to the same tokens and that a task to evaluate is no wider than the
head. The file carries a sha256 of its own fields and of ``head.safetensors``: an edit of either is caught.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from polar_vbll.checkpoint import sha256_file
from polar_vbll.errors import CheckpointError, UserInputError

READOUT_FILE = "readout.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Readout:
    prompt_template: int
    num_classes: int
    answer_letters: list[str]
    answer_token_ids: list[int]
    answer_tokens: list[str]
    max_length: int
    add_bos: bool
    padding_side: str = "left"


def _digest(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def make_readout(tokenizer, answer_ids: list[int], max_length: int, add_bos: bool) -> Readout:
    from polar_vbll.tasks import TEMPLATE_VERSION, answer_letters

    return Readout(
        prompt_template=TEMPLATE_VERSION,
        num_classes=len(answer_ids),
        answer_letters=answer_letters(len(answer_ids)),
        answer_token_ids=list(answer_ids),
        answer_tokens=list(tokenizer.convert_ids_to_tokens(answer_ids)),
        max_length=max_length,
        add_bos=add_bos,
        padding_side=tokenizer.padding_side,
    )


def save_readout(directory: Path, readout: Readout) -> Path:
    """Write ``readout.json`` beside an existing ``head.safetensors`` (whose sha256 it records)."""
    fields = {"format_version": FORMAT_VERSION, **asdict(readout)}
    fields["head_sha256"] = sha256_file(directory / "head.safetensors")
    path = directory / READOUT_FILE
    path.write_text(json.dumps({**fields, "sha256": _digest(fields)}, indent=2) + "\n")
    return path


def load_readout(directory: Path) -> Readout:
    """The run's readout, verified (its own fields and ``head.safetensors`` unaltered)."""
    path = directory / READOUT_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: the run was written by an older polar-vbll (or did not finish); retrain it"
        )
    try:
        raw = json.loads(path.read_text())
        recorded = raw.pop("sha256")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{path} is not a readable readout file: {exc}") from None
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {raw.get('format_version')!r} is not {FORMAT_VERSION}")
    if _digest(raw) != recorded:
        raise CheckpointError(f"{path} was altered after the run wrote it (its sha256 does not match)")
    head = directory / "head.safetensors"
    if not head.is_file() or sha256_file(head) != raw.get("head_sha256"):
        raise CheckpointError(f"{head} is missing or was altered after the run wrote it (sha256 mismatch)")
    fields = {k: v for k, v in raw.items() if k not in ("format_version", "head_sha256")}
    return Readout(**fields)


def check_readout(readout: Readout, tokenizer, source: str) -> None:
    """The current code and tokenizer read the class logits as the run did: same prompt template, same
    token id for every answer letter. Raises :class:`UserInputError` naming what differs."""
    from polar_vbll.tasks import TEMPLATE_VERSION
    from polar_vbll.tokens import answer_token_ids

    if readout.prompt_template != TEMPLATE_VERSION:
        raise UserInputError(
            f"{source} was trained with prompt template version {readout.prompt_template}; this polar-vbll "
            f"builds version {TEMPLATE_VERSION} prompts, so its numbers would not be the run's; retrain it"
        )
    now = answer_token_ids(tokenizer, readout.answer_letters)
    if now != readout.answer_token_ids:
        raise UserInputError(
            f"the tokenizer now maps the answer letters {readout.answer_letters} to token ids {now}, the run "
            f"{source} read {readout.answer_token_ids}; use the run's model and tokenizer"
        )


def check_width(readout: Readout, widest: int, what: str) -> None:
    """A task to evaluate must fit the run's head: questions with more choices than answer letters cannot
    be scored. Raises :class:`UserInputError` naming both widths."""
    if widest > readout.num_classes:
        raise UserInputError(
            f"{what} has questions with {widest} choices, but the run's head reads {readout.num_classes} answer "
            f"letters ({', '.join(readout.answer_letters)}); evaluate it on a task with at most "
            f"{readout.num_classes} choices, or train with that task among data.ood_tasks"
        )
