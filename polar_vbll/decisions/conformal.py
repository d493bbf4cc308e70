"""Split-conformal answer sets (Vovk et al. 2005; Angelopoulos & Bates 2021, "A gentle introduction to
conformal prediction", sections 1-2), computed by MAPIE (``mapie.classification.SplitConformalClassifier``).

Given the predictive probabilities ``p`` (N, K) of held-out *calibration* questions and their labels, a
conformity score ``s(x, y)`` is computed for every calibration row and its conformal quantile
``q = the ceil((n + 1)(1 - alpha)) / n empirical quantile`` is taken; the answer set of a new question is
``{y : s(x, y) <= q}``. When calibration and new questions are exchangeable the set contains the true answer
with probability at least ``1 - alpha`` (marginally, over both draws). Two scores:

- ``lac`` (least ambiguous set-valued classifier; Sadinle, Lei & Wasserman 2019): ``s = 1 - p_y``. Smallest
  average sets; the guarantee is marginal.
- ``aps`` (adaptive prediction sets; Romano, Sesia & Candes 2020): ``s`` = the probability mass of the
  classes ranked above ``y`` plus a uniform fraction of ``p_y`` (randomised at calibration with the given
  seed); sets are built non-randomised (the last class is always included: ``include_last_label=True``),
  so they are conservative. Larger sets, closer to conditional coverage.

Why MAPIE: of the conformal libraries, MAPIE (scikit-learn-contrib) ships both scores and the Learn-then-
Test risk control the decision rule also needs (``polar_vbll.decisions.selective``), depends only on numpy,
scipy and scikit-learn; torchcp needs torchvision, torch-geometric and a C++ build, and crepes has neither
APS nor risk control. MAPIE expects a fitted scikit-learn classifier; :class:`ProbabilityPassthrough` is a
"classifier" whose input *is* the predictive (N, K), so any method's probabilities (a VBLL head's, an
ensemble's mixture, a temperature-scaled softmax) go through MAPIE unchanged.

With two choices (calibration labels of two classes) MAPIE offers LAC only: APS's sets are then the same
family (both choices when the top probability is low), and the APS fields are None.

Padded classes (questions with fewer choices than the head's width carry probability exactly 0) are never
in a set: the true answer is always a real choice, so removing them keeps the guarantee.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from polar_vbll.extras import require

Score = Literal["lac", "aps"]
SCORES: tuple[Score, ...] = ("lac", "aps")


class UnsupportedScore(ValueError):
    """MAPIE offers APS only for more than two classes among the calibration labels: with two choices its
    sets are the same family as LAC's (both choices when the top probability is low), so LAC serves."""


def _passthrough_class():
    from sklearn.base import BaseEstimator, ClassifierMixin

    class ProbabilityPassthrough(ClassifierMixin, BaseEstimator):
        """A fitted scikit-learn "classifier" whose features are its own class probabilities (N, K)."""

        def __init__(self, n_classes: int = 2):
            self.n_classes = n_classes

        def fit(self, X=None, y=None):  # noqa: N803 - scikit-learn's signature
            self.classes_ = np.arange(self.n_classes)
            self.n_features_in_ = self.n_classes
            return self

        def predict_proba(self, X):  # noqa: N803
            return np.asarray(X, dtype=np.float64)

        def predict(self, X):  # noqa: N803
            return np.asarray(X).argmax(axis=1)

    return ProbabilityPassthrough


def _as_numpy_probs(probs: torch.Tensor | np.ndarray) -> np.ndarray:
    p = torch.as_tensor(probs).detach().to(device="cpu", dtype=torch.float64).numpy()
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs must have shape (N, K >= 2), got {tuple(p.shape)}")
    return p


def valid_mask(n_choices: torch.Tensor | np.ndarray, width: int) -> np.ndarray:
    """(N, width) bool: True where the class is a real choice of the question (index < n_choices)."""
    c = np.asarray(torch.as_tensor(n_choices).cpu().numpy()).reshape(-1, 1)
    return np.arange(width)[None, :] < c


@dataclass
class ConformalSets:
    """A split-conformal answer-set predictor at miscoverage ``alpha`` with score ``score``, calibrated on
    ``n`` questions. ``quantile`` is MAPIE's conformal quantile of the calibration scores (in the score's
    units: ``1 - p`` for LAC, cumulative probability for APS)."""

    score: Score
    alpha: float
    n: int
    quantile: float
    _mapie: object

    @classmethod
    def calibrate(
        cls,
        probs: torch.Tensor | np.ndarray,
        labels: torch.Tensor | np.ndarray,
        alpha: float,
        score: Score = "lac",
        seed: int = 0,
    ) -> ConformalSets:
        """Fit on calibration ``probs`` (N, K) and ``labels`` (N,). Raises ``ValueError`` for ``alpha``
        outside (0, 1), an unknown score, mismatched shapes, or fewer than
        ``max(1 / alpha, 1 / (1 - alpha))`` questions (MAPIE's limit)."""
        require("polar_vbll.decisions")  # MAPIE: a core dependency, imported lazily
        from mapie.classification import SplitConformalClassifier

        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
        if score not in SCORES:
            raise ValueError(f"unknown conformity score {score!r}; choose one of {list(SCORES)}")
        p = _as_numpy_probs(probs)
        y = np.asarray(torch.as_tensor(labels).cpu().numpy()).astype(np.int64).reshape(-1)
        if y.shape[0] != p.shape[0] or p.shape[0] == 0:
            raise ValueError(f"calibration needs N > 0 rows of probs and labels, got {p.shape[0]} and {y.shape[0]}")
        if score == "aps" and np.unique(y).size <= 2:
            raise UnsupportedScore("APS sets need calibration labels of more than two classes (MAPIE: binary "
                                   "targets take LAC only)")  # fmt: skip
        need = math.ceil(max(1.0 / alpha, 1.0 / (1.0 - alpha)) - 1e-9)
        if p.shape[0] < need:  # MAPIE's own limit
            raise ValueError(f"{p.shape[0]} calibration questions are too few for alpha {alpha:g}: conformal sets "
                             f"need at least {need} (use more held-out questions or a larger alpha)")  # fmt: skip
        estimator = _passthrough_class()(p.shape[1]).fit()
        scc = SplitConformalClassifier(
            estimator, confidence_level=1.0 - alpha, conformity_score=score, prefit=True, random_state=seed
        )
        with warnings.catch_warnings():  # MAPIE warns when n is too small for alpha; we report quantile inf
            warnings.simplefilter("ignore")
            scc.conformalize(p, y)
            scc.predict_set(p[:1])  # MAPIE computes its quantile at the first prediction
        quantile = float(np.asarray(scc._mapie_classifier.conformity_score_function_.quantiles_).reshape(-1)[0])
        return cls(score, float(alpha), int(p.shape[0]), quantile, scc)

    def predict_sets(self, probs: torch.Tensor | np.ndarray, n_choices: torch.Tensor | np.ndarray) -> np.ndarray:
        """(N, K) bool answer sets of new questions (padded classes excluded)."""
        p = _as_numpy_probs(probs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, sets = self._mapie.predict_set(p, conformity_score_params={"include_last_label": True})
        return np.asarray(sets[:, :, 0], dtype=bool) & valid_mask(n_choices, p.shape[1])


def set_metrics(sets: np.ndarray, labels: torch.Tensor | np.ndarray) -> dict[str, float]:
    """Empirical ``coverage`` (fraction of rows whose set holds the label) and ``mean_size`` (choices per
    set) of answer sets (N, K), by MAPIE's ``classification_coverage_score`` and
    ``classification_mean_width_score``."""
    require("polar_vbll.decisions")  # MAPIE: a core dependency, imported lazily
    from mapie.metrics.classification import classification_coverage_score, classification_mean_width_score

    y = np.asarray(torch.as_tensor(labels).cpu().numpy()).astype(np.int64).reshape(-1)
    s = np.asarray(sets, dtype=bool)[:, :, None]
    return {
        "coverage": float(np.asarray(classification_coverage_score(y, s)).reshape(-1)[0]),
        "mean_size": float(np.asarray(classification_mean_width_score(s)).reshape(-1)[0]),
    }
