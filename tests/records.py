"""A test helper: what ``polar-vbll predict`` writes for some questions, as API records (the references the
MLflow model's and the server's answers are checked against)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from polar_vbll_cli.app import app

#: Three questions of two to four choices, one with a context, two with answers.
QUESTIONS = [
    {"question": "What is 2 + 2?", "choices": ["3", "4", "5"], "id": "q1"},
    {"question": "Is the sky blue?", "choices": ["no", "yes"], "id": "q2", "answer": 1},
    {"question": "Which is a fruit?", "choices": ["apple", "car", "stone", "cloud"], "id": "q3", "context": "Food.",
     "answer": 0},
]  # fmt: skip


def predict_cli(run: Path, rows: list[dict], tmp_path: Path) -> list[dict]:
    """``polar-vbll predict RUN`` on ``rows`` (question dicts), its records without the file's line numbers."""
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in rows))
    out = tmp_path / "d.jsonl"
    result = CliRunner().invoke(app, ["predict", str(run), "-i", str(questions), "-o", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    for r in records:
        del r["line"]  # the file's line numbers; API records have none
    return records
