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


def evidence_prior_var(head, phi: torch.Tensor, labels: torch.Tensor, n_choices: torch.Tensor, fit_cfg,
                       xatol: float = 1e-3) -> float:  # fmt: skip
    """The prior variance ``s_p`` the evidence chooses for ``head`` (a VBLL head: rows of width D on its own
    feature map) on training features ``phi`` (N, d): the maximiser over ``s_p`` of the Laplace log evidence
    of the MAP linear head under the same feature map and a zero-mean ``N(0, s_p I)`` prior, the MAP refitted
    at every ``s_p`` (type-II maximum likelihood; the Laplace structure ``full`` while ``K D <= 16384``, else
    ``kron``). MacKay's fixed point (:func:`fit_probe`, which holds the MAP's Hessian fixed while it moves the
    prior) starts a bounded scalar search (SciPy's ``minimize_scalar``) over ``log s_p`` within a factor 100
    of it, to ``xatol`` in ``log s_p``. The VBLL head's ``prior_fit: evidence``."""
    from scipy.optimize import minimize_scalar

    k, d = head.num_classes, head.in_features
    lin = LinearHead(torch.zeros(k, d), None, dataset_size=len(phi), features=head.feature_map.config,
                     prior="gaussian")  # fmt: skip
    structure = "full" if k * lin.feature_map.out_features <= 16384 else "kron"
    lin = fit_probe(lin, phi, labels, n_choices, fit_cfg, structure=structure)  # MacKay: the start
    lin.requires_grad_(True)

    def negative_evidence(t: float) -> float:
        lin.prior_var = math.exp(t)
        fit_to_convergence(lin, phi, labels, n_choices, max_iter=fit_cfg.max_iter, tolerance=fit_cfg.tolerance)
        la = LastLayerLaplace.from_head(lin, structure=structure, prior_precision=math.exp(-t))
        return -la.fit(phi, labels, n_choices).log_marginal_likelihood()

    t0 = math.log(lin.prior_var)
    found = minimize_scalar(negative_evidence, bounds=(t0 - math.log(100), t0 + math.log(100)), method="bounded",
                            options={"xatol": xatol})  # fmt: skip
    return math.exp(float(found.x))


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
