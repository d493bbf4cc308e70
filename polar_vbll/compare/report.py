"""Comparison tables: per-(task, method) mean ± std over seeds, as Markdown and CSV, with the honesty guard.

Each record is one (method, task, seed) result with metrics as fractions (``acc``, ``ece``, ``nll``,
``brier``, ``logit_var``, ``epistemic``), its temperature-scaled metrics when the run has them, the
evaluation split's guard block (``polar_vbll.guards``: the uniform and majority-class predictors, chance
accuracy and its standard error) and per OOD set its metrics and AUROCs. :func:`table_rows` turns them into
the rows of a table: per task the uniform and majority-class predictors first, then every method, each
temperature-scaled method as its own "+ TS" row; a method whose accuracy is below chance + 2 standard errors
is flagged (its ECE and NLL measure abstention, not calibration). ACC, ECE and AUROC are in percent.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PERCENT = ("acc", "ece", "answered", "selective_risk", "lac_coverage", "aps_coverage")
KEYS = ("acc", "ece", "nll", "brier", "logit_var", "epistemic")
OOD_KEYS = ("acc", "ece", "nll", "auroc_msp", "auroc_entropy", "auroc_epistemic")
UNIFORM, MAJORITY = "uniform predictor", "majority-class predictor"
GIB = 2**30
#: the run keys the cost columns come from, also in the CSV (``s_per_1k``: seconds of the evaluation split's
#: prediction per 1,000 questions; ``peak_memory_bytes``; ``stable_rank_mean``: the adapters' final mean)
COST_KEYS = ("passes_per_example", "s_per_1k", "peak_memory_bytes", "peak_memory_kind", "stable_rank_mean")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def _scale(key: str) -> float:
    return 100.0 if key in PERCENT or key.startswith(("ood_auroc", "auroc")) else 1.0


def table_rows(records: Sequence[dict[str, Any]], labels: dict[str, str]) -> list[dict[str, Any]]:
    """The per-run rows a table aggregates, in order: per task and seed the two guard predictors (once),
    then each record, then its temperature-scaled twin. ``labels``: method name -> display label."""
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, int]] = set()
    for r in records:
        chance = r.get("chance")
        if chance and (r["task"], r["seed"]) not in seen:
            seen.add((r["task"], r["seed"]))
            for name, key in ((UNIFORM, "uniform"), (MAJORITY, "majority")):
                out.append({"task": r["task"], "method": name, "seed": r["seed"], "metrics": chance[key],
                            "guard": True})  # fmt: skip
    for r in records:
        label = labels.get(r["method"], r["method"])
        out.append({**r, "method": label})
        if r.get("ts_metrics"):
            out.append({**r, "method": f"{label} + TS", "metrics": r["ts_metrics"], "ood": r.get("ts_ood", {}),
                        "temperature": r.get("temperature")})  # fmt: skip
    order: dict[str, int] = {}
    for row in out:
        order.setdefault(row["task"], len(order))
    rank = {UNIFORM: 0, MAJORITY: 1}
    return sorted(out, key=lambda row: (order[row["task"]], rank.get(row["method"], 2)))


def aggregate(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, method) in first-seen order with ``<key>_mean`` / ``<key>_std`` (scaled: percent
    for ACC, ECE and AUROC), the number of seeds, the seeds at chance and the OOD means per set."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["task"], r["method"]), []).append(r)
    rows = []
    for (task, method), rs in groups.items():
        row: dict[str, Any] = {"task": task, "method": method, "seeds": len(rs), "guard": rs[0].get("guard", False)}
        keys = [k for k, v in rs[0]["metrics"].items() if isinstance(v, (int, float)) and k != "n"]
        for key in keys:
            vals = [r["metrics"][key] for r in rs if r["metrics"].get(key) is not None]
            m, s = mean_std([v * _scale(key) for v in vals])
            row[f"{key}_mean"], row[f"{key}_std"] = m, s
        for key in ("passes_per_example", "train_s", "test_s", "temperature", "s_per_1k", "stable_rank_mean"):
            vals = [float(r[key]) for r in rs if r.get(key) is not None and math.isfinite(float(r[key]))]
            if vals and len(vals) == len(rs):  # every seed has it (else the cell stays empty)
                row[key] = statistics.fmean(vals)
        peaks = [r["peak_memory_bytes"] for r in rs if r.get("peak_memory_bytes") is not None]
        if peaks:  # the largest over seeds: a peak
            row["peak_memory_gib"] = max(peaks) / GIB
            row["peak_memory_lifetime"] = any(r.get("peak_memory_kind") == "rss_process_peak" for r in rs)
        if "at_chance" in rs[0]:
            row["at_chance"] = sum(bool(r["at_chance"]) for r in rs)
        ood: dict[str, dict[str, tuple[float, float]]] = {}
        for name in rs[0].get("ood", {}):
            ood[name] = {}
            for key in OOD_KEYS:
                vals = [r["ood"][name].get(key) for r in rs if name in r.get("ood", {})]
                vals = [v * _scale(key) for v in vals if v is not None]
                if vals:
                    ood[name][key] = mean_std(vals)
        row["ood"] = ood
        row["n_test"] = rs[0]["metrics"].get("n")
        rows.append(row)
    return rows


def _fmt(m: float | None, s: float | None, seeds: int, digits: int) -> str:
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "–"
    if seeds < 2:  # one seed has no spread to show
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _pm(row: dict[str, Any], key: str, digits: int) -> str:
    return _fmt(row.get(f"{key}_mean"), row.get(f"{key}_std"), row.get("seeds", 2), digits)


def _chance_cell(row: dict[str, Any]) -> str:
    if row.get("guard"):
        return "(reference)"
    if "at_chance" not in row:
        return "–"
    n, k = row["seeds"], row["at_chance"]
    return "**at chance**" if k == n else ("no" if k == 0 else f"**at chance in {k}/{n}**")


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The main table: one block per task (guard predictors first), mean ± std over seeds."""
    header = ["Task", "Method", "ACC (%)", "ECE (%)", "NLL", "Brier", "AURC", "logit var", "at chance?",
              "passes / example", "s / 1k q.", "peak mem (GiB)", "stable rank", "train s", "test s",
              "seeds"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["task"], row["method"], _pm(row, "acc", 1), _pm(row, "ece", 1), _pm(row, "nll", 3),
                 _pm(row, "brier", 3), _pm(row, "aurc", 3), _pm(row, "logit_var", 3), _chance_cell(row)]  # fmt: skip
        cells.append(f"{row['passes_per_example']:g}" if "passes_per_example" in row else "–")
        cells += _cost_cells(row)
        cells.append(f"{row['train_s']:.{0 if row['train_s'] >= 10 else 1}f}" if "train_s" in row else "–")
        cells.append(f"{row['test_s']:.1f}" if "test_s" in row else "–")
        cells.append(str(row["seeds"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cost_cells(row: dict[str, Any]) -> list[str]:
    """Seconds per 1,000 questions, peak memory (GiB; † a process-lifetime peak, polar_vbll.peak) and the
    adapters' stable rank of one table row."""
    per_1k = f"{row['s_per_1k']:.{1 if row['s_per_1k'] >= 10 else 2}f}" if "s_per_1k" in row else "–"
    peak = "–"
    if "peak_memory_gib" in row:
        peak = f"{row['peak_memory_gib']:.2f}" + (" †" if row.get("peak_memory_lifetime") else "")
    rank = f"{row['stable_rank_mean']:.2f}" if "stable_rank_mean" in row else "–"
    return [per_1k, peak, rank]


def decision_table(rows: Sequence[dict[str, Any]]) -> str:
    """Per task and method: AURC, the fraction answered and their error rate at the decision rule's target
    risk, and the conformal sets' coverage and size (LAC, APS). Empty when no row has them."""
    header = ["Task", "Method", "ACC (%)", "AURC", "answered (%)", "risk (%)", "LAC coverage (%)", "LAC size",
              "APS coverage (%)", "APS size", "at chance?"]  # fmt: skip
    lines = []
    for row in rows:
        if row.get("guard") or "lac_size_mean" not in row:
            continue
        cells = [row["task"], row["method"], _pm(row, "acc", 1), _pm(row, "aurc", 3), _pm(row, "answered", 1),
                 _pm(row, "selective_risk", 1), _pm(row, "lac_coverage", 1), _pm(row, "lac_size", 2),
                 _pm(row, "aps_coverage", 1), _pm(row, "aps_size", 2), _chance_cell(row)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    if not lines:
        return ""
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *lines])


def ood_table(rows: Sequence[dict[str, Any]]) -> str:
    """Per trained task and OOD set: each method's ACC/ECE/NLL on the shifted set and AUROC of telling it
    from the test set by max-probability, predictive entropy and the epistemic score (– where a method has
    no epistemic part). Empty when no row has OOD sets."""
    header = ["Task", "OOD set", "Method", "ACC (%)", "ECE (%)", "NLL", "AUROC MSP (%)", "AUROC entropy (%)",
              "AUROC epistemic (%)"]  # fmt: skip
    lines = []
    for row in rows:
        for name, block in row.get("ood", {}).items():
            cells = [row["task"], name, row["method"]]
            for key, digits in zip(OOD_KEYS, (1, 1, 3, 1, 1, 1), strict=True):
                m, s = block.get(key, (None, None))
                cells.append(_fmt(m, s, row["seeds"], digits))
            lines.append("| " + " | ".join(cells) + " |")
    if not lines:
        return ""
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *lines])


def write_csv(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Every (method, task, seed) record, one row each, metrics as fractions (as computed); a
    temperature-scaled run adds ``ts_*`` columns, OOD sets ``ood_<set>_*`` columns."""
    path = Path(path)
    flat = [_flat(r) for r in records]
    keys = sorted({k for f in flat for k in f})
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "method", "seed", *keys])
        for r, fr in zip(records, flat, strict=True):
            w.writerow([r["task"], r["method"], r["seed"], *(fr.get(k, "") for k in keys)])
    return path


def _flat(r: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in r["metrics"].items() if v is not None}
    out.update({f"ts_{k}": v for k, v in (r.get("ts_metrics") or {}).items() if v is not None})
    for name, block in r.get("ood", {}).items():
        out.update({f"ood_{name}_{k}": v for k, v in block.items() if v is not None})
    for key in ("train_s", "test_s", "temperature", "at_chance", *COST_KEYS):
        if r.get(key) is not None:
            out[key] = r[key]
    return out
