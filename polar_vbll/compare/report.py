"""Comparison tables: per-(task, method) mean ± std over seeds, as Markdown and CSV.

Each record is one (method, task, seed) result with metrics as fractions (``acc``, ``ece``, ``nll``,
``brier``, optional ``ood_auroc_*``), the backbone passes per test example and wall times. ACC, ECE and OOD
AUROC are reported in percent with the unit in the column name.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PERCENT = ("acc", "ece")
COLUMNS = [
    ("acc", "ACC (%)"),
    ("ece", "ECE (%)"),
    ("nll", "NLL"),
    ("brier", "Brier"),
]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def _scale(key: str) -> float:
    return 100.0 if key in PERCENT or key.startswith("ood_auroc") else 1.0


def aggregate(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, method) in first-seen order with ``<key>_mean`` / ``<key>_std`` (scaled: percent
    for ACC, ECE and AUROC) and the number of seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["task"], r["method"]), []).append(r)
    rows = []
    for (task, method), rs in groups.items():
        row: dict[str, Any] = {"task": task, "method": method, "seeds": len(rs)}
        keys = [k for k in rs[0]["metrics"] if isinstance(rs[0]["metrics"][k], (int, float)) and k != "n"]
        for key in keys:
            m, s = mean_std([r["metrics"][key] * _scale(key) for r in rs])
            row[f"{key}_mean"], row[f"{key}_std"] = m, s
        for key in ("passes_per_example", "train_s", "test_s"):
            if key in rs[0]:
                row[key] = statistics.fmean(float(r[key]) for r in rs)
        row["n_test"] = rs[0]["metrics"].get("n")
        rows.append(row)
    return rows


def _auroc_header(key: str) -> str:
    """``ood_auroc_<task>`` (by max-probability) and ``ood_auroc_entropy_<task>`` (by predictive entropy)."""
    if key.startswith("ood_auroc_entropy_"):
        return f"AUROC entropy {key.removeprefix('ood_auroc_entropy_')} (%)"
    return f"AUROC MSP {key.removeprefix('ood_auroc_')} (%)"


def _pm(row: dict[str, Any], key: str, digits: int) -> str:
    m, s = row.get(f"{key}_mean"), row.get(f"{key}_std")
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "–"
    if row.get("seeds", 2) < 2:  # one seed has no spread to show
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(rows: Sequence[dict[str, Any]], ood_keys: Sequence[str] = ()) -> str:
    """The comparison table: one block per task, mean ± std over seeds."""
    header = ["Task", "Method", "ACC (%)", "ECE (%)", "NLL", "Brier"]
    header += [_auroc_header(k) for k in ood_keys]
    header += ["passes / example", "train s", "test s", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["task"], row["method"], _pm(row, "acc", 1), _pm(row, "ece", 1), _pm(row, "nll", 3)]
        cells.append(_pm(row, "brier", 3))
        cells += [_pm(row, k, 1) for k in ood_keys]
        cells.append(f"{row['passes_per_example']:g}" if "passes_per_example" in row else "–")
        cells.append(f"{row['train_s']:.{0 if row['train_s'] >= 10 else 1}f}" if "train_s" in row else "–")
        cells.append(f"{row['test_s']:.1f}" if "test_s" in row else "–")
        cells.append(str(row["seeds"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Every (method, task, seed) record, one row each, metrics as fractions (as computed)."""
    path = Path(path)
    metric_keys = sorted({k for r in records for k in r["metrics"]})
    extra = ["passes_per_example", "train_s", "test_s"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "method", "seed", *metric_keys, *extra])
        for r in records:
            w.writerow(
                [r["task"], r["method"], r["seed"], *(r["metrics"].get(k, "") for k in metric_keys)]
                + [r.get(k, "") for k in extra]
            )
    return path
