"""``polar-vbll predict`` and ``polar-vbll calibrate`` on files: read and check questions, write decision
records, print the summary.

Input: JSONL, one question per line (``question``, ``choices``; optional ``answer``, ``context``, ``id``;
docs/data.md's row format with ``answer`` optional), or a ``csv:``, ``parquet:``, ``json:``, ``hf:`` source
read through the run's ``data.columns`` (``polar_vbll.tasks.inputs``). Every row is checked before any
prediction (file, line or row, and field or column on error; a question with more choices than the run's
head names both widths). Output: JSONL,
one decision record per input row in input order (docs/predict.md), written to a temporary file beside the
output and renamed when complete, so an existing output is replaced only by a finished one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from polar_vbll.config import check_outlives_the_job
from polar_vbll.errors import DataError, UserInputError
from polar_vbll.predictor import Question, SummaryAccumulator, check_width
from polar_vbll.saved import RunFolder
from polar_vbll.tasks import hf_source
from polar_vbll.tasks.inputs import read_items, source_path
from polar_vbll.tasks.jsonl import iter_json_lines_at, parse_question_row

#: ``decide(chunk) -> records``, or an iterator of every chunk's records in order (Ray Data).
ChunkDecider = Callable[[Sequence[Question]], list[dict[str, Any]]]


@dataclass(frozen=True)
class Chunk:
    """Where one chunk of a JSONL file of questions lies: the byte offset and line number of its first
    question, and how many questions it holds (blank lines between them are skipped)."""

    offset: int
    line: int
    count: int


@dataclass(frozen=True)
class QuestionFile:
    """A plain JSONL file of questions checked in one streaming pass (:func:`scan_questions`) and read
    again chunk by chunk (:meth:`read`), so that no more than a chunk of it is ever held in memory."""

    path: str
    chunks: tuple[Chunk, ...]
    total: int

    def read(self, chunk: Chunk) -> list[Question]:
        """The questions of ``chunk`` (already checked by the scan)."""
        out = []
        for lineno, row, _ in iter_json_lines_at(self.path, chunk.offset, chunk.line):
            example, has = parse_question_row(row, f"{self.path}, line {lineno}", lineno, f"jsonl:{self.path}")
            out.append(Question(example, has, lineno))
            if len(out) == chunk.count:
                break
        if len(out) != chunk.count:
            raise DataError(f"{self.path} changed while it was being read (line {chunk.line} on); predict it again")
        return out

    def __iter__(self) -> Iterator[list[Question]]:
        return (self.read(c) for c in self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)


def streamed_path(source: str | Path, split: str | None = None) -> str | None:
    """The file of ``source`` when it is read in a streaming pass (a plain, not gzipped, JSONL path or
    ``jsonl:`` source), else None (gzipped JSONL, ``csv:``, ``parquet:``, ``json:``, ``hf:`` sources are read
    whole, :func:`read_questions`)."""
    name = os.fspath(source)
    if hf_source.is_source(name) or split is not None:
        return None
    if ":" in name.split("/", 1)[0] and not name.startswith("jsonl:"):
        return None  # csv:, parquet:, json: (a path's first component has no colon)
    path = os.path.expanduser(name.removeprefix("jsonl:"))
    return None if path.endswith(".gz") else path


def scan_questions(path: str, folder: RunFolder, chunk_size: int) -> QuestionFile:
    """Check every question of the JSONL file ``path`` (as :func:`read_questions` does: file, line, field;
    no rows; too many choices) in one streaming pass, and note where each chunk of ``chunk_size`` starts."""
    if chunk_size < 1:
        raise UserInputError(f"--batch-size must be at least 1, got {chunk_size}")
    starts: list[tuple[int, int]] = []
    total = 0
    for lineno, row, offset in iter_json_lines_at(path):
        example, has = parse_question_row(row, f"{path}, line {lineno}", lineno, f"jsonl:{path}")
        check_width(folder, [Question(example, has, lineno)], path)
        if total % chunk_size == 0:
            starts.append((offset, lineno))
        total += 1
    if not total:
        raise UserInputError(f"{path}: no questions (the file is empty or holds only blank lines)")
    counts = [chunk_size] * (len(starts) - 1) + [total - chunk_size * (len(starts) - 1)]
    return QuestionFile(path, tuple(Chunk(o, ln, n) for (o, ln), n in zip(starts, counts, strict=True)), total)


def read_questions(source: str | Path, folder: RunFolder, split: str | None = None) -> list[Question]:
    """Every question of ``source`` (a JSONL path, or a ``jsonl:``, ``csv:``, ``parquet:``, ``json:``, ``hf:``
    source, ``split`` choosing among several), checked (``DataError``: file, line or row, field or column;
    no rows; too many choices)."""
    source = os.fspath(source)
    items = read_items(source, run_columns=folder.cfg.data.columns, split=split)
    questions = [Question(it.example, it.has_answer, it.line, it.line_kind) for it in items]
    check_width(folder, questions, source)
    return questions


def read_calibration(source: str | Path, folder: RunFolder, split: str | None = None) -> tuple[list, str | None]:
    """Held-out questions *with answers* for ``calibrate --data`` (the sources :func:`read_questions` reads)
    and the file's sha256 (64 hex digits; None for a folder or a hub dataset)."""
    source = os.fspath(source)
    items = read_items(source, run_columns=folder.cfg.data.columns, split=split, answers=True)
    check_width(folder, [Question(it.example, True, it.line, it.line_kind) for it in items], source)
    path = source_path(source)
    if path is None or not os.path.isfile(path):
        return [it.example for it in items], None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return [it.example for it in items], h.hexdigest()


def chunked(questions: Sequence[Question], size: int) -> list[Sequence[Question]]:
    """Consecutive chunks of ``size`` questions (the unit predicted together)."""
    if size < 1:
        raise UserInputError(f"--batch-size must be at least 1, got {size}")
    return [questions[i : i + size] for i in range(0, len(questions), size)]


def check_output(output: str | Path, inputs: Iterable[str | Path]) -> Path:
    """The output path, refused when it is an input, its folder does not exist, or Ray deletes it with a
    submitted job (:func:`polar_vbll.config.check_outlives_the_job`)."""
    out = Path(output)
    check_outlives_the_job(out, "--output")
    for p in inputs:
        p = source_path(os.fspath(p)) or os.fspath(p)
        if Path(p).exists() and out.exists() and out.resolve() == Path(p).resolve():
            raise UserInputError(f"--output {out} is the input file; write the decisions elsewhere")
    if not out.parent.is_dir():
        raise UserInputError(f"--output {out}: the folder {out.parent} does not exist")
    if out.is_dir():
        raise UserInputError(f"--output {out} is a folder; give a file name")
    return out


def write_records(output: Path, records: Iterator[list[dict[str, Any]]], total: int, progress: bool) -> dict:
    """Write every chunk's records as JSON lines (a temporary file renamed at the end); returns their
    summary (:class:`polar_vbll.predictor.SummaryAccumulator`: the records themselves are not kept)."""
    tmp = output.with_name(f".{output.name}.partial")
    acc = SummaryAccumulator()
    try:
        with open(tmp, "w", encoding="utf-8") as fh, tqdm(total=total, desc="predict", unit="q",
                                                          disable=not progress) as bar:  # fmt: skip
            for chunk in records:
                for r in chunk:
                    fh.write(json.dumps(r, ensure_ascii=False) + "\n")
                acc.update(chunk)
                bar.update(len(chunk))
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
    return acc.result()


def format_summary(s: dict[str, Any], rule=None) -> str:
    """The closing lines of ``predict`` (the rule's description first, warnings included)."""
    n = s["questions"]
    pct = lambda k: f"{100 * k / n:.1f}%" if n else "-"  # noqa: E731
    lines = (rule.describe() if rule is not None else []) + [
        f"{n} question{'s' if n != 1 else ''}: {s['answer']} answered ({pct(s['answer'])}), {s['abstain']} abstained "
        f"({pct(s['abstain'])}), {s['escalate']} flagged out-of-distribution ({pct(s['escalate'])})",
        "answer sets: mean size " + ", ".join(f"{s[f'mean_set_size_{k}']:.2f} ({k.upper()})" for k in ("lac", "aps")
                                              if s[f"mean_set_size_{k}"] is not None),
    ]
    if s["with_answer"]:
        risk = s["risk_of_answered"]
        lines.append(
            f"on the {s['with_answer']} rows with an answer: accuracy {100 * s['accuracy']:.1f}%, ECE "
            f"{100 * s['ece']:.1f}%; risk of the answered {'-' if risk is None else f'{100 * risk:.1f}%'} "
            f"({s['answered_with_answer']} answered); set coverage "
            + ", ".join(f"{100 * s[f'coverage_{k}']:.1f}% ({k.upper()})" for k in ("lac", "aps")
                        if s[f"coverage_{k}"] is not None)
        )
    return "\n".join(lines)


def format_rule(rule) -> str:
    """What ``calibrate`` found, in a few lines."""
    s, t = rule.settings, rule.threshold
    n = t.n
    if s.risk is not None:
        target = f"selective risk <= {s.risk:g} with probability >= {1 - s.delta:g} (Learn-then-Test, {s.fwer})"
    else:
        target = f"coverage {s.coverage:g} of the calibration questions (no risk guarantee)"
    if t.tau is None:
        answer = (f"no threshold meets the target on these {n} questions: every question will be abstained on "
                  "(loosen --risk, raise --delta, or calibrate on more questions)")  # fmt: skip
    else:
        risk = "-" if t.risk is None else f"{100 * t.risk:.1f}%"
        answer = (f"answer when confidence >= {t.tau:.3f}: on the calibration questions {100 * t.coverage:.1f}% "
                  f"answered, risk {risk}")  # fmt: skip
    sets = ", ".join(f"{k.upper()} quantile {c.quantile:.4f}" for k, c in rule.sets.items())
    if "aps" not in rule.sets:
        sets += " (APS: not for two-choice questions, where LAC's sets are the same family)"
    temp = rule.meta.get("temperature")
    return "\n".join([
        f"calibrated on {n} questions: {rule.meta.get('source')}"
        + (f" (temperature {temp:.3f} applied)" if temp else ""),
        f"target: {target}",
        answer,
        f"conformal sets at alpha {s.alpha:g}: {sets}",
        (f"OOD flag: {rule.ood_score} score above {rule.ood_threshold:.4g} ({100 * s.ood_pass:g}% of "
         "in-distribution questions pass)") if math.isfinite(rule.ood_threshold) else rule.describe()[-1],
    ])  # fmt: skip


def predict_file(
    total: int, output: Path, chunks_records: Iterator[list[dict[str, Any]]], progress: bool
) -> dict[str, Any]:
    """Write the records of ``total`` questions and return the summary."""
    return write_records(output, chunks_records, total, progress)
