"""A trainable linear softmax head on the head's view of the features: the MLE and MAP baselines' head,
set up exactly like the VBLL head's mean so that "VBLL vs MLE/MAP" compares Bayesian against not, not a
trained head against a frozen one.

``z = W x``, ``x = FeatureMap(phi)`` (``polar_vbll.heads.features``: standardised with training-set
statistics stored in the head, plus a bias column), ``W`` (K, D) initialised from the LM head's
answer-token rows re-expressed on x, so training starts at the zero-shot model. The loss per example:

- ``prior="none"`` (MLE): ``CE = -(1/B) sum_b log softmax(W x_b)_{y_b}``;
- ``prior="gaussian"`` (MAP): ``CE + ||W - W0||^2 / (2 s_p N)``, the negative log posterior per example
  under the VBLL head's prior ``N(W0, s_p I)`` with ``s_p = prior_scale * 2 / D`` and ``W0 = 0``;
  the penalty is :meth:`LinearHead.regularizer` (logged beside the data term).

It is trained jointly with the adapters (the theta-phase's gradient step, a plain Adam; see
``polar_vbll.training.trainer``), not by the eta-phase: an unregularised softmax on fewer examples than
features is separable and has no finite minimiser, so "fit to convergence" is not defined for MLE.
Knows nothing of any trainer.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from polar_vbll.heads.deterministic import masked_logits
from polar_vbll.heads.features import FeatureMap, FeatureMapConfig


class LinearHead(nn.Module):
    """Trainable ``z = W FeatureMap(phi)`` (see the module docstring).

    Args:
        weight: (K, d) raw-feature rows to start from (the LM head's answer rows); bias: (K,) or None.
        dataset_size: N, the training-set size (the MAP penalty is divided by it).
        features: the feature map's settings (None: raw phi, no bias column).
        prior: ``"none"`` (MLE) or ``"gaussian"`` (MAP).
        prior_scale: ``s_p = prior_scale * 2 / D`` (the VBLL head's convention).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        dataset_size: int = 1,
        features: FeatureMapConfig | None = None,
        prior: Literal["none", "gaussian"] = "none",
        prior_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"LinearHead: weight must be (K, d), got shape {tuple(weight.shape)}")
        if prior not in ("none", "gaussian"):
            raise ValueError(f"LinearHead: prior must be 'none' or 'gaussian', got {prior!r}")
        if dataset_size < 1 or prior_scale <= 0:
            raise ValueError("LinearHead: dataset_size must be >= 1 and prior_scale > 0")
        k, d = weight.shape
        self.feature_map = FeatureMap(d, features)
        self.prior = prior
        self.dataset_size = int(dataset_size)
        self.prior_var = prior_scale * 2.0 / self.feature_map.out_features
        w = self.feature_map.from_raw(weight.detach(), None if bias is None else bias.detach())
        self.weight = nn.Parameter(w.to(torch.float32))

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, prior={self.prior}, prior_var={self.prior_var:.3g}"

    def logits(self, phi: torch.Tensor, n_choices: torch.Tensor) -> torch.Tensor:
        x = self.feature_map(phi)
        return masked_logits(x @ self.weight.to(x.dtype).T, n_choices.to(x.device))

    def regularizer(self) -> torch.Tensor:
        """``||W||^2 / (2 s_p N)`` for the MAP head, 0 for MLE (a scalar)."""
        if self.prior == "none":
            return torch.zeros((), dtype=self.weight.dtype, device=self.weight.device)
        return self.weight.square().sum() / (2.0 * self.prior_var * self.dataset_size)

    def loss(self, phi: torch.Tensor, labels: torch.Tensor, n_choices: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the batch, plus the MAP penalty per example."""
        return F.cross_entropy(self.logits(phi, n_choices), labels.to(phi.device).long()) + self.regularizer()

    @torch.no_grad()
    def predict_proba(self, phi: torch.Tensor, n_choices: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(phi, n_choices), dim=-1).to(torch.float32)

    @torch.no_grad()
    def fit_features(self, phi: torch.Tensor) -> None:
        """Set the feature statistics from training features ``phi`` (N, d) and re-express W so the logits
        do not change (done once, before training)."""
        old = self.feature_map.fit(phi)
        self.weight.copy_(self.feature_map.reexpress(self.weight, old))
