"""Selective prediction: answer only when confident enough, and control the risk of the answers.

A question is *answered* when its confidence (the predictive's max probability) is at least a threshold
``tau``, else the model *abstains*. ``coverage(tau)`` is the fraction answered, ``selective risk(tau)`` the
error rate among the answered (Geifman & El-Yaniv 2017).

- :func:`risk_coverage_curve` / :func:`aurc`: questions sorted by confidence (highest first; ties in input
  order), the selective risk of the top ``k`` for ``k = 1..N`` against coverage ``k / N``; AURC is its mean
  (Geifman, Uziel & El-Yaniv 2019, "Bias-reduced uncertainty estimation for deep neural classifiers",
  eq. 1): lower is better, a random ranking scores the error rate, a perfect one
  ``e + (1 - e) ln(1 - e)`` for error rate ``e`` (:func:`optimal_aurc`). Computed as ``1 - AUARC`` with
  MAPIE's ``mapie.metrics.uncertainty.auarc`` (the same curve in accuracy).
- :func:`risk_threshold`: the threshold that keeps the selective risk at most ``r`` with probability at
  least ``1 - delta`` over the calibration draw, by Learn-then-Test (Angelopoulos, Bates, Candes, Jordan &
  Lei 2021/2025): every threshold on a fixed grid (:func:`threshold_grid`: ``n`` equally spaced on
  ``[1/K, 1)``) is a hypothesis "selective risk > r", tested with the binary Hoeffding-Bentkus p-value on
  the calibration questions it answers, under family-wise error control (Bonferroni-Holm by default); the
  lowest rejected threshold (the most answers) is returned. MAPIE's ``BinaryClassificationController``
  (risk ``precision``: the accuracy of the answered, at least ``1 - r``) does the testing. The guarantee
  is for new questions exchangeable with the calibration ones; it says nothing about out-of-distribution
  questions.
- :func:`coverage_threshold`: the threshold answering a target fraction of the calibration questions
  (no risk guarantee: the calibration set's risk at it is reported instead).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from polar_vbll.extras import require

FWER = Literal["bonferroni_holm", "bonferroni"]
#: Thresholds Learn-then-Test tests by default (``decision.thresholds``).
DEFAULT_THRESHOLDS = 10


def threshold_grid(num_classes: int, n: int = DEFAULT_THRESHOLDS) -> np.ndarray:
    """The ``n`` thresholds tested: equally spaced on ``[1/K, 1)`` for a head of width ``K`` (a confidence
    is never below ``1/K``), fixed before seeing data as Learn-then-Test requires. Each threshold costs
    power (the family-wise correction divides ``delta`` among them): with a few hundred calibration
    questions, ten is a good trade (bench/RESULTS.md)."""
    if num_classes < 2 or n < 1:
        raise ValueError(f"a threshold grid needs K >= 2 classes and n >= 1 thresholds, got {num_classes}, {n}")
    return np.linspace(1.0 / num_classes, 1.0, n + 1)[:-1]


def _arrays(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    conf = torch.as_tensor(confidence).detach().to(device="cpu", dtype=torch.float64).numpy().reshape(-1)
    ok = torch.as_tensor(correct).detach().cpu().numpy().reshape(-1).astype(np.float64)
    if conf.shape != ok.shape:
        raise ValueError(f"confidence has {conf.shape[0]} entries, correct {ok.shape[0]}")
    if conf.size == 0:
        raise ValueError("selective prediction needs at least one question")
    if not np.isfinite(conf).all():
        raise ValueError("confidence must be finite")
    if not np.isin(ok, (0.0, 1.0)).all():
        raise ValueError("correct must hold only 0/1 (or False/True)")
    return conf, ok


def confidence_and_correct(probs: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The max probability (N,) and whether the argmax is the label (N,) of a predictive (N, K)."""
    p = torch.as_tensor(probs).detach().to(device="cpu", dtype=torch.float64)
    y = torch.as_tensor(labels).detach().cpu().long()
    return p.max(dim=1).values.numpy(), (p.argmax(dim=1) == y).numpy().astype(np.float64)


def risk_coverage_curve(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    """``(coverage (N,), selective risk (N,))``: ``coverage[k-1] = k / N`` and the error rate of the ``k``
    most confident questions (ties in input order)."""
    conf, ok = _arrays(confidence, correct)
    order = np.argsort(-conf, kind="stable")
    k = np.arange(1, conf.size + 1, dtype=np.float64)
    return k / conf.size, np.cumsum(1.0 - ok[order]) / k


def aurc(confidence, correct) -> float:
    """Area under the risk-coverage curve (fraction; lower is better), ``1 - AUARC`` by MAPIE."""
    require("polar_vbll.decisions")  # MAPIE: a core dependency, imported lazily
    from mapie.metrics.uncertainty import auarc

    conf, ok = _arrays(confidence, correct)
    return 1.0 - float(auarc(ok, conf))


def optimal_aurc(error_rate: float) -> float:
    """The AURC of a perfect ranking (every error after every correct answer) at error rate ``e``, in the
    continuous limit: ``e + (1 - e) ln(1 - e)`` (Geifman et al. 2019, section 3)."""
    e = float(error_rate)
    return e if e >= 1.0 else e + (1.0 - e) * math.log1p(-e)


@dataclass(frozen=True)
class Threshold:
    """A confidence threshold ``tau`` (None: no threshold meets the target, abstain on everything) and what
    it does on the ``n`` calibration questions: the fraction answered and their error rate (None when none
    is answered)."""

    tau: float | None
    n: int
    coverage: float
    risk: float | None


def _at(tau: float | None, conf: np.ndarray, ok: np.ndarray) -> Threshold:
    answered = conf >= tau if tau is not None else np.zeros_like(conf, dtype=bool)
    risk = float(1.0 - ok[answered].mean()) if answered.any() else None
    return Threshold(tau, int(conf.size), float(answered.mean()), risk)


def risk_threshold(
    confidence, correct, risk: float, delta: float = 0.1, fwer: FWER = "bonferroni_holm", grid: np.ndarray | None = None
) -> Threshold:
    """The Learn-then-Test threshold for selective risk at most ``risk`` with probability ``1 - delta``
    (see the module docstring) over ``grid`` (default: :func:`threshold_grid` of a binary head). Raises
    ``ValueError`` for ``risk`` or ``delta`` outside (0, 1)."""
    require("polar_vbll.decisions")  # MAPIE: a core dependency, imported lazily
    from mapie.risk_control import BinaryClassificationController

    for name, value in (("risk", risk), ("delta", delta)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must lie in (0, 1), got {value}")
    if fwer not in ("bonferroni_holm", "bonferroni"):
        raise ValueError(f"unknown family-wise error control {fwer!r}; choose bonferroni_holm or bonferroni")
    conf, ok = _arrays(confidence, correct)
    grid = threshold_grid(2) if grid is None else np.asarray(grid, dtype=np.float64)
    # A threshold above every calibration confidence answers nothing: its p-value is 1 (MAPIE gives NaN,
    # which breaks Holm's ordering). Testing only the others at level delta * kept / len(grid) rejects a
    # subset of what the whole grid at level delta would: the guarantee is kept.
    kept = grid[grid <= conf.max()]
    if kept.size == 0:
        return _at(None, conf, ok)
    controller = BinaryClassificationController(
        predict_function=lambda x: np.concatenate([1.0 - x, x], axis=1),
        risk="precision",
        target_level=1.0 - risk,
        confidence_level=1.0 - delta * kept.size / grid.size,
        list_predict_params=kept,
        fwer_method=fwer,
    )
    with warnings.catch_warnings():  # MAPIE warns when no threshold is valid; the caller reports tau None
        warnings.simplefilter("ignore")
        controller.calibrate(conf[:, None], ok.astype(int))
    valid = np.asarray(controller.valid_predict_params, dtype=np.float64).reshape(-1)
    # every rejected hypothesis holds simultaneously (FWER control): the lowest answers the most
    return _at(float(valid.min()) if valid.size else None, conf, ok)


def coverage_threshold(confidence, correct, coverage: float) -> Threshold:
    """The highest threshold that answers at least a fraction ``coverage`` of the calibration questions.
    Raises ``ValueError`` for ``coverage`` outside (0, 1]."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must lie in (0, 1], got {coverage}")
    conf, ok = _arrays(confidence, correct)
    k = max(1, math.ceil(coverage * conf.size - 1e-9))
    return _at(float(np.sort(conf)[::-1][k - 1]), conf, ok)
