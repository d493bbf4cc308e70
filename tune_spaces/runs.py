"""``polar-vbll runs``: a search's runs and their key metrics, read from the tracking store.

For a terminal: no MLflow UI needed. Given a search folder, reads its embedded store (or the server of
``MLFLOW_TRACKING_URI``, the store the search wrote to); without one, lists every search in the store.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from polar_vbll.errors import UserInputError
from polar_vbll.files import read_json
from polar_vbll.tracking import client_for, local_store, mask_uri
from tune_spaces.trial import TAG_PARENT, TAG_ROLE, TAG_SEARCH

#: Columns of a search's trial list.
RUN_METRICS = ("val_nll", "val_ece", "val_acc", "test_nll", "test_ece", "test_acc", "orthogonality_error")


def store_of(folder: Path) -> tuple[str, dict[str, Any]]:
    """The tracking URI a search folder wrote to, and its ``search.json`` record."""
    record_path = Path(folder) / "search.json"
    if not record_path.is_file():
        raise UserInputError(f"{folder} is not a search folder (no search.json); run `polar-vbll tune` first")
    record = read_json(record_path, "the search record", "rerun the search (polar-vbll tune) to rewrite it")
    local_uri, _ = local_store(folder)
    if record.get("tracking_uri") == mask_uri(local_uri):
        return local_uri, record
    import os

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri or mask_uri(uri) != record.get("tracking_uri"):
        raise UserInputError(
            f"search {folder} logged to {record.get('tracking_uri')}; set MLFLOW_TRACKING_URI to that server"
        )
    return uri, record


def list_trials(folder: Path) -> tuple[list[str], list[list[str]]]:
    """One row per trial run of the search in ``folder``: name, status, searched values, metrics."""
    uri, record = store_of(folder)
    client = client_for(uri)
    runs = client.search_runs(
        [record["experiment_id"]], filter_string=f"tags.`{TAG_PARENT}` = '{record['parent_run_id']}'"
    )
    searched: list[str] = []
    for run in runs:
        for k in json.loads(run.data.tags.get("polar_vbll.searched", "{}")):
            if k not in searched:
                searched.append(k)
    header = ["run", "status", *searched, "step", *RUN_METRICS]
    rows = []
    for run in sorted(runs, key=lambda r: r.data.metrics.get("val_nll", float("inf"))):
        values = json.loads(run.data.tags.get("polar_vbll.searched", "{}"))
        m = run.data.metrics
        step = _last_step(client, run.info.run_id)
        rows.append(
            [run.info.run_name, _status(run), *[_fmt(values.get(k)) for k in searched], str(step)]
            + [_fmt(m.get(k)) for k in RUN_METRICS]
        )
    return header, rows


def list_searches(uri: str) -> tuple[list[str], list[list[str]]]:
    """One row per search (parent run) in the store at ``uri``."""
    client = client_for(uri)
    exps = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in exps], filter_string=f"tags.`{TAG_ROLE}` = 'search'")
    header = ["search", "status", "space", "best_val_nll", "best_val_ece", "best_val_acc", "started"]
    rows = []
    for run in runs:
        m = run.data.metrics
        rows.append(
            [
                run.data.tags.get(TAG_SEARCH, run.info.run_name),
                run.info.status,
                run.data.tags.get("polar_vbll.space", ""),
                _fmt(m.get("best_val_nll")),
                _fmt(m.get("best_val_ece")),
                _fmt(m.get("best_val_acc")),
                _time(run.info.start_time),
            ]
        )
    return header, rows


def list_searches_under(folder: Path) -> tuple[list[str], list[list[str]]]:
    """Every search folder directly below ``folder`` (e.g. ``runs/``), one row each, from its store."""
    found = sorted(p.parent for p in Path(folder).glob("*/search.json"))
    if not found:
        raise UserInputError(
            f"{folder} holds no search folders (no */search.json); run `polar-vbll tune` first"
        )
    header: list[str] = []
    rows: list[list[str]] = []
    for search in found:
        uri, _ = store_of(search)
        header, more = list_searches(uri)
        rows += more
    return header, rows


def _status(run) -> str:
    end = run.data.tags.get("polar_vbll.end")
    return f"{run.info.status} ({end})" if end and end != "completed" else run.info.status


def _last_step(client, run_id: str) -> int | str:
    try:
        hist = client.get_metric_history(run_id, "val_nll")
    except Exception:
        return ""
    return max((h.step for h in hist), default="")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _time(ms: int | None) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M") if ms else ""


def render(header: list[str], rows: list[list[str]]) -> str:
    """An aligned plain-text table for the terminal."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)
