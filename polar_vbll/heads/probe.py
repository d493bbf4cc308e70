"""The linear probe: is the signal there at all? An L2 logistic regression (a MAP linear head,
``polar_vbll.heads.linear``) on the frozen backbone's features, its prior variance chosen by the evidence.

MacKay's evidence framework (MacKay 1992, "The evidence framework applied to classification networks"):
alternate the MAP fit of W under ``N(0, s_p I)`` (full-batch L-BFGS to convergence,
``polar_vbll.heads.fit``) with the prior precision ``1 / s_p`` that maximises the Laplace approximation of
the marginal likelihood at that MAP (``polar_vbll.heads.laplace.LastLayerLaplace``, the same
``head.laplace.structure``), until ``s_p`` changes by less than ``tolerance`` (relative) or ``rounds``
updates. Only the training split is used: nothing is tuned on validation or test.
"""

from __future__ import annotations

import copy
import math

import torch

from polar_vbll.heads.fit import fit_to_convergence
from polar_vbll.heads.laplace import LastLayerLaplace
from polar_vbll.heads.linear import LinearHead


def fit_probe(
    head: LinearHead,
    phi: torch.Tensor,
    labels: torch.Tensor,
    n_choices: torch.Tensor,
    fit_cfg,
    structure: str = "full",
    rounds: int = 20,
    tolerance: float = 1e-3,
) -> LinearHead:
    """A copy of ``head`` standardised on ``phi`` (N, d) and fitted as the evidence-optimal MAP (see the
    module docstring); ``probe_report`` holds the rounds, final prior variance and the last fit's report."""
    probe = copy.deepcopy(head)
    probe.prior = "gaussian"
    probe.requires_grad_(True)
    probe.fit_features(phi)
    updates = 0
    report = fit_to_convergence(probe, phi, labels, n_choices, max_iter=fit_cfg.max_iter, tolerance=fit_cfg.tolerance)
    for _ in range(rounds):
        la = LastLayerLaplace.from_head(probe, structure=structure).fit(phi, labels, n_choices)
        new = 1.0 / la.prior_precision
        if abs(math.log(new / probe.prior_var)) < tolerance:
            break
        probe.prior_var = new
        updates += 1
        report = fit_to_convergence(probe, phi, labels, n_choices, max_iter=fit_cfg.max_iter,
                                    tolerance=fit_cfg.tolerance)  # fmt: skip
    probe.requires_grad_(False)
    probe.probe_report = {"evidence_updates": updates, "prior_var": probe.prior_var, **report.as_dict()}
    return probe
