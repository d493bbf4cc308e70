"""The one ``results.json`` schema, written by every entry point (``train``, ``train --workers``,
``compare``, a search trial) and validated on write.

Metrics are fractions (``acc``, ``ece``, ``nll``, ``brier``, ``n``); the evaluation split is ``eval``
(the run's ``data.eval_split``, usually ``test``). :func:`flat_metrics` gives the scalar keys a search
scheduler and MLflow compare (``val_nll``, ``test_ece``, ``ood_auroc_<task>``, ...).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

SCHEMA_VERSION = 2
ENTRY_POINTS = ("train", "train --workers", "compare", "tune", "eval")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitMetrics(_Model):
    """Calibration metrics of one split's predictive probabilities (fractions; ``n`` examples)."""

    acc: float
    ece: float
    nll: float
    brier: float
    n: int


class OODMetrics(SplitMetrics):
    """An OOD set's own metrics, and AUROC of telling it from the evaluation split (0.5 = chance) by
    max-probability (``auroc_msp``) and predictive entropy (``auroc_entropy``)."""

    auroc_msp: float
    auroc_entropy: float


class Metrics(_Model):
    eval: SplitMetrics
    validation: SplitMetrics
    zero_shot: SplitMetrics | None
    ood: dict[str, OODMetrics]


class Training(_Model):
    """How one member was trained: steps, the step a resume started from, head refits, the last logged
    loss, the orthogonality error ``max ||X^T X - I||_F`` of its Stiefel factors (0 for LoRA), the
    stable ranks of its updates and the logged history."""

    steps: int
    resumed_from_step: int | None
    refits: int
    loss: float | None
    orthogonality_error: float
    stable_rank_mean: float | None
    stable_ranks: dict[str, float]
    history: list[dict[str, int | float]]
    reused: bool = False  # trained once for an identical earlier run of a comparison, not again


class Distributed(_Model):
    world_size: int
    zero_stage: int
    memory: list[dict[str, Any]]
    replica_digests: list[str | None]


class RunResults(_Model):
    """What a finished run reports (``<run folder>/results.json``)."""

    schema_version: Literal[2] = SCHEMA_VERSION
    entry_point: Literal["train", "train --workers", "compare", "tune", "eval"]
    name: str
    method: str
    label: str
    task: str
    eval_split: str
    split_sizes: dict[str, int]
    data_fingerprints: dict[str, str]  # split -> sha256 of its token ids, labels, choice counts (16 digits)
    prompts_shortened: dict[str, dict[str, int]]  # split -> part (passage, choices, question) -> prompts
    passes_per_example: int
    metrics: Metrics
    training: Training
    ensemble_members: list[Training] | None = None
    distributed: Distributed | None = None
    timings: dict[str, float]
    machine: dict[str, Any]
    params: dict[str, Any]


def machine_info() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def validate_results(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` checked against :class:`RunResults` (raises pydantic's ``ValidationError``), as JSON."""
    return RunResults.model_validate(data).model_dump(mode="json")


def write_results(data: dict[str, Any], path: str | Path) -> Path:
    """Validate and write ``results.json``."""
    path = Path(path)
    path.write_text(json.dumps(validate_results(data), indent=2))
    return path


def settings_digest(results: dict[str, Any]) -> str:
    """The digest of what produced a run's results: its whole config and the fingerprints of its splits
    (a comparison reuses a recorded run only when this matches)."""
    from polar_vbll.provenance import digest

    return digest({"params": results["params"], "data": results["data_fingerprints"]})


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """``val_*``, ``test_*`` (the evaluation split), ``zero_shot_*``, ``ood_auroc_<task>``,
    ``ood_auroc_entropy_<task>`` and ``ood_acc_<task>`` as flat scalars (``:`` in a task name becomes
    ``_``)."""
    m = results["metrics"]
    out: dict[str, float] = {}
    for prefix, block in (("val_", m["validation"]), ("test_", m["eval"]), ("zero_shot_", m.get("zero_shot"))):
        if block:
            out.update({prefix + k: float(block[k]) for k in ("acc", "ece", "nll", "brier")})
    for task, block in m["ood"].items():
        t = task.replace(":", "_")
        out[f"ood_auroc_{t}"] = float(block["auroc_msp"])
        out[f"ood_auroc_entropy_{t}"] = float(block["auroc_entropy"])
        out[f"ood_acc_{t}"] = float(block["acc"])
    return out
