"""Fitting a head on fixed features to convergence: the eta-phase of the alternating optimization.

:func:`fit_to_convergence` minimises ``head.loss(phi, labels, n_choices)`` (for the VBLL head the negative
ELBO per example, its KL weighted 1/N; for a MAP head the cross-entropy plus the Gaussian prior's penalty
over N) over the head's trainable parameters with full-batch L-BFGS (strong-Wolfe line search), on a
float64 copy of the head, and copies the result back. It stops when the largest gradient entry is below
``tolerance`` (converged) or after ``max_iter`` iterations, and reports both. The fixed features make the
objective deterministic, so a quasi-Newton method converges in tens to hundreds of iterations where
first-order steps of fixed count stop wherever the count runs out.

With ``empirical_bayes`` (a VBLL head with ``prior_fit: empirical_bayes``) it alternates the fit of q with
the closed-form prior-variance update (``VBLLHead.empirical_bayes_prior_var``, coordinate descent on the
negative ELBO) until the prior variance changes by less than ``prior_tolerance`` (relative) or
``prior_rounds`` updates were made, and ends with a fit of q under the final prior.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from polar_vbll.errors import HeadFitDiverged


@dataclass
class FitReport:
    """How an eta-phase went: L-BFGS ``iterations`` and loss ``evaluations`` (summed over empirical-Bayes
    rounds), the final gradient's L2 norm and largest entry, the final loss split into its data term and
    regulariser (per example), whether the gradient tolerance was met, and the prior variance after the
    fit with the number of empirical-Bayes updates (0 for a fixed prior)."""

    iterations: int
    evaluations: int
    grad_norm: float
    grad_max: float
    loss: float
    loss_data: float
    loss_regularizer: float
    converged: bool
    prior_var: float | None
    prior_rounds: int

    def as_dict(self) -> dict[str, float | int | bool | None]:
        return asdict(self)


def _lbfgs(
    head: nn.Module, phi: torch.Tensor, labels: torch.Tensor, n_choices: torch.Tensor, max_iter: int,
    tolerance: float, history: int,
) -> tuple[int, int]:  # fmt: skip
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(
        params, lr=1.0, max_iter=max_iter, max_eval=max_iter * 5 // 4 + 20, tolerance_grad=tolerance,
        tolerance_change=1e-15, history_size=history, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        loss = head.loss(phi, labels, n_choices)
        if torch.isfinite(loss):
            loss.backward()
        else:  # an overshooting line-search trial: report it as very bad so the search backs off
            loss = torch.full((), torch.finfo(loss.dtype).max / 4, dtype=loss.dtype)
            for p in params:
                p.grad = torch.zeros_like(p)
        return loss

    opt.step(closure)
    state = opt.state[params[0]]
    return int(state.get("n_iter", 0)), int(state.get("func_evals", 0))


def _gradient(head: nn.Module, phi, labels, n_choices) -> tuple[torch.Tensor, torch.Tensor]:
    params = [p for p in head.parameters() if p.requires_grad]
    loss = head.loss(phi, labels, n_choices)
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), torch.cat([g.reshape(-1) for g in grads])


def fit_to_convergence(
    head: nn.Module,
    phi: torch.Tensor,
    labels: torch.Tensor,
    n_choices: torch.Tensor,
    *,
    max_iter: int = 500,
    tolerance: float = 1e-6,
    history: int = 20,
    empirical_bayes: bool = False,
    prior_rounds: int = 30,
    prior_tolerance: float = 1e-4,
) -> FitReport:
    """Fit ``head``'s trainable parameters on fixed ``phi`` (N, d) in place (see the module docstring).

    Raises :class:`~polar_vbll.errors.HeadFitDiverged` when the fitted parameters or the loss are not
    finite. The head's own dtype is kept (the work happens on a float64 copy)."""
    if phi.shape[0] == 0:
        raise HeadFitDiverged("the eta-phase got no training features")
    work = copy.deepcopy(head).to(torch.float64)
    x = phi.detach().to(torch.float64)
    y, c = labels.detach().long(), n_choices.detach().long()
    iterations = evaluations = rounds = 0
    it, ev = _lbfgs(work, x, y, c, max_iter, tolerance, history)
    iterations, evaluations = iterations + it, evaluations + ev
    if empirical_bayes:
        for _ in range(prior_rounds):
            old, new = work.prior_var, work.empirical_bayes_prior_var()
            if abs(math.log(new / old)) < prior_tolerance:
                break
            work.set_prior_var(new)
            rounds += 1
            it, ev = _lbfgs(work, x, y, c, max_iter, tolerance, history)
            iterations, evaluations = iterations + it, evaluations + ev
    loss, grad = _gradient(work, x, y, c)
    finite = torch.isfinite(loss) and all(torch.isfinite(p).all() for p in work.parameters())
    if not finite:
        raise HeadFitDiverged(
            f"the eta-phase (L-BFGS on fixed features) ended with a non-finite loss or head ({float(loss)}); "
            "check the features for non-finite values"
        )
    regularizer = getattr(work, "regularizer", None)
    reg = float(regularizer().detach()) if regularizer is not None else 0.0
    with torch.no_grad():
        for name, value in work.state_dict().items():
            target = head.state_dict()[name]
            target.copy_(value.to(target.dtype))
    return FitReport(
        iterations=iterations,
        evaluations=evaluations,
        grad_norm=float(grad.norm()),
        grad_max=float(grad.abs().max()),
        loss=float(loss),
        loss_data=float(loss) - reg,
        loss_regularizer=reg,
        converged=bool(grad.abs().max() <= tolerance),
        prior_var=float(work.prior_var) if hasattr(work, "prior_var") else None,
        prior_rounds=rounds,
    )
