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

SCHEMA_VERSION = 3
ENTRY_POINTS = ("train", "train --workers", "compare", "tune", "eval")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitMetrics(_Model):
    """Calibration metrics of one split's predictive probabilities (fractions; ``n`` examples), and the
    mean logit variance and epistemic score (nats) of the predictive (``polar_vbll.predictives``; None
    where not computed: the zero-shot row, temperature-scaled predictions)."""

    acc: float
    ece: float
    nll: float
    brier: float
    n: int
    logit_var: float | None = None
    epistemic: float | None = None
    aurc: float | None = None  # area under the risk-coverage curve (max-probability ranking; lower is better)


class SetMetrics(_Model):
    """Conformal answer sets on the evaluation split: the fraction holding the answer, choices per set."""

    coverage: float
    mean_size: float


class DecisionMetrics(_Model):
    """The decision rule (``decision.*`` settings) calibrated on validation, applied to the evaluation split
    (``polar_vbll.evaluation.decision_block``): the threshold ``tau`` (None: none meets the target risk),
    the fraction answered and their error rate on validation and evaluation, the conformal sets, and the
    fraction of the evaluation split and of each OOD set the OOD flag raises."""

    risk_target: float
    delta: float
    alpha: float
    tau: float | None
    val_coverage: float
    val_risk: float | None
    coverage: float
    selective_risk: float | None
    lac: SetMetrics
    aps: SetMetrics | None  # None: two-choice calibration labels, where MAPIE offers LAC only
    ood_score: str
    ood_flagged: dict[str, float]


class OODMetrics(SplitMetrics):
    """An OOD set's own metrics, and AUROC of telling it from the evaluation split (0.5 = chance) by
    max-probability (``auroc_msp``), predictive entropy (``auroc_entropy``) and the epistemic score
    (``auroc_epistemic``; None for a method without one: a single deterministic model)."""

    auroc_msp: float
    auroc_entropy: float
    auroc_epistemic: float | None = None


class Chance(_Model):
    """The honesty guard on the evaluation split (``polar_vbll.guards``): the uniform and majority-class
    predictors, chance accuracy and its standard error, and whether this run's accuracy is below chance
    plus two standard errors."""

    uniform: SplitMetrics
    majority: SplitMetrics
    chance_acc: float
    chance_se: float
    at_chance: bool


class Scaled(_Model):
    """The same splits after temperature scaling with ``temperature`` (fitted on validation)."""

    temperature: float
    eval: SplitMetrics
    validation: SplitMetrics | None  # None: another task's evaluation (polar-vbll eval), the run's temperature
    ood: dict[str, OODMetrics]
    decision: DecisionMetrics | None = None


class Metrics(_Model):
    eval: SplitMetrics
    validation: SplitMetrics | None  # None only from `polar-vbll eval` on another task
    zero_shot: SplitMetrics | None
    ood: dict[str, OODMetrics]
    decision: DecisionMetrics | None = None
    chance: Chance | None = None
    temperature_scaled: Scaled | None = None
    posterior: dict[str, Any] | None = None  # the predictive's post-hoc step (TFB's variance search), if any
    jensen_gap: dict[str, Any] | None = None  # a VBLL head: its training bound vs the Monte Carlo data term


class Training(_Model):
    """How one member was trained: steps, the step a resume started from, head refits (each full
    eta-phase's L-BFGS iterations, final gradient norm, loss parts and prior variance in ``head_fits``),
    the last logged loss and its parts, the orthogonality error ``max ||X^T X - I||_F`` of its Stiefel
    factors (0 for LoRA), the stable ranks of its updates and the logged history."""

    steps: int
    resumed_from_step: int | None
    batch_size: int | None = None  # examples per step (train.batch_size, clamped to the training split)
    refits: int
    loss: float | None
    orthogonality_error: float
    stable_rank_mean: float | None
    stable_ranks: dict[str, float]
    history: list[dict[str, int | float]]
    loss_data: float | None = None  # the last logged loss's data term (a head with a prior)
    loss_regularizer: float | None = None  # and its regulariser ((KL - log p(sigma)) / N, or the MAP penalty / N)
    head_fits: list[dict[str, int | float | bool | None]] = []  # one report per full eta-phase
    reused: bool = False  # trained once for an identical earlier run of a comparison, not again
    # warm starts (PBT's exploits): the step and the settings that changed there, {key: [then, now]}
    warm_starts: list[dict[str, Any]] = []


class Distributed(_Model):
    world_size: int
    zero_stage: int
    sharded_load: bool = False  # ZeRO-3 backbone built partitioned, each rank reading its partition
    data_split: str = "replicate"  # DistConfig.data_split: every rank the whole split, or its own shard
    memory: list[dict[str, Any]]
    replica_digests: list[str | None]
    # per rank: the examples whose cached frozen-prefix states it holds per split, their bytes, and the
    # seconds of its training split's prefix pass (empty in results written before)
    prefix: list[dict[str, Any]] = []


class RunResults(_Model):
    """What a finished run reports (``<run folder>/results.json``)."""

    schema_version: Literal[3] = SCHEMA_VERSION
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
    # where it ran (polar_vbll.placement): the device resolved from model.device, its name, the backbone's
    # dtype, and the fp32 adapters and heads; None in results written before devices were recorded
    placement: dict[str, Any] | None = None
    # settings the run was given that its method does not read (polar_vbll.support.unused_settings)
    unused_settings: dict[str, Any] | None = None
    timings: dict[str, float]
    # the process's (CPU: peak resident set) or device's (CUDA: max allocated) peak memory while the evaluation
    # split was predicted: {"bytes", "kind", "device"} (polar_vbll.peak); None in results written before
    peak_memory: dict[str, Any] | None = None
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
    """``val_*``, ``test_*`` (the evaluation split; ``test_aurc``, the decision rule's ``test_answered``,
    ``test_selective_risk``, ``test_{lac,aps}_{coverage,set_size}``), ``zero_shot_*``, ``ood_auroc_<task>``,
    ``ood_auroc_entropy_<task>`` and ``ood_acc_<task>`` as flat scalars (``<task>``: the task's
    ``tasks.task_folder`` name, ``:`` replaced by ``_``)."""
    from polar_vbll.tasks.registry import task_folder

    m = results["metrics"]
    out: dict[str, float] = {}
    for prefix, block in (("val_", m["validation"]), ("test_", m["eval"]), ("zero_shot_", m.get("zero_shot"))):
        if block:
            out.update({prefix + k: float(block[k]) for k in ("acc", "ece", "nll", "brier")})
    for task, block in m["ood"].items():
        t = task_folder(task).replace(":", "_")  # a task named by a path: its plain folder name
        out[f"ood_auroc_{t}"] = float(block["auroc_msp"])
        out[f"ood_auroc_entropy_{t}"] = float(block["auroc_entropy"])
        if block.get("auroc_epistemic") is not None:
            out[f"ood_auroc_epistemic_{t}"] = float(block["auroc_epistemic"])
        out[f"ood_acc_{t}"] = float(block["acc"])
    for prefix, block in (("val_", m["validation"]), ("test_", m["eval"])):
        for k in ("logit_var", "epistemic"):
            if block and block.get(k) is not None:
                out[prefix + k] = float(block[k])
    scaled = m.get("temperature_scaled")
    if scaled:
        out["temperature"] = float(scaled["temperature"])
        out.update({f"test_ts_{k}": float(scaled["eval"][k]) for k in ("acc", "ece", "nll", "brier")})
    for prefix, block in (("val_", m["validation"]), ("test_", m["eval"])):
        if block and block.get("aurc") is not None:
            out[prefix + "aurc"] = float(block["aurc"])
    dec = m.get("decision")
    if dec:
        out["test_answered"] = float(dec["coverage"])
        if dec["selective_risk"] is not None:
            out["test_selective_risk"] = float(dec["selective_risk"])
        for score in ("lac", "aps"):
            if dec.get(score):
                out[f"test_{score}_coverage"] = float(dec[score]["coverage"])
                out[f"test_{score}_set_size"] = float(dec[score]["mean_size"])
    if m.get("chance"):
        out["chance_acc"] = float(m["chance"]["chance_acc"])
        out["at_chance"] = float(m["chance"]["at_chance"])
    return out
