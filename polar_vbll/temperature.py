"""Temperature scaling (Guo, Pleiss, Sun, Weinberger 2017, "On calibration of modern neural networks"):
one scalar ``T > 0`` fitted on the validation split's NLL, applied post hoc to any predictive.

For a predictive ``p`` (N, K), the scaled predictive is ``softmax(log p / T)``; for a softmax head this is
exactly ``softmax(z / T)`` on its logits ``z`` (the normalising constant of ``log p`` cancels), so the same
code serves every method. Classes with probability 0 (padding) stay at 0. The NLL of
``softmax(beta * log p)`` is convex in ``beta = 1 / T`` (a log-sum-exp of linear functions minus a linear
one), so its minimiser is found by bisection on the derivative, to 1e-10 in ``log beta``, within
``[1e-3, 1e3]`` (a bound is returned when the derivative has one sign over the whole range). Fitted on
validation only: the evaluation split never informs it.
"""

from __future__ import annotations

import math

import torch

_BOUNDS = (1e-3, 1e3)


def _log_probs(probs: torch.Tensor) -> torch.Tensor:
    return torch.log(probs.detach().to(torch.float64))  # log 0 = -inf: padded classes stay excluded


def _nll_slope(logp: torch.Tensor, labels: torch.Tensor, beta: float) -> float:
    """d/d beta of the mean NLL of softmax(beta * logp): E_q[logp] - logp_y averaged, q the scaled probs."""
    z = beta * logp
    q = torch.softmax(z, dim=-1)
    finite = torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))
    expected = (q * finite).sum(-1)
    true = finite.gather(1, labels.view(-1, 1)).squeeze(1)
    return float((expected - true).mean())


def fit_temperature(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature ``T`` minimising the mean NLL of ``softmax(log probs / T)`` on (validation)
    ``probs`` (N, K) and ``labels`` (N,). Raises ``ValueError`` on an empty split or a label whose
    probability is 0 (an infinite NLL that no temperature repairs)."""
    if probs.ndim != 2 or probs.shape[0] == 0 or labels.shape != (probs.shape[0],):
        raise ValueError(f"temperature scaling needs probs (N > 0, K) and labels (N,), got {tuple(probs.shape)}")
    logp = _log_probs(probs)
    labels = labels.long().to(logp.device)
    if not torch.isfinite(logp.gather(1, labels.view(-1, 1))).all():
        raise ValueError("temperature scaling: a validation label has probability 0 (infinite NLL)")
    lo, hi = (math.log(1.0 / b) for b in reversed(_BOUNDS))  # log beta bounds
    if _nll_slope(logp, labels, math.exp(lo)) >= 0:
        return 1.0 / math.exp(lo)
    if _nll_slope(logp, labels, math.exp(hi)) <= 0:
        return 1.0 / math.exp(hi)
    while hi - lo > 1e-10:
        mid = 0.5 * (lo + hi)
        if _nll_slope(logp, labels, math.exp(mid)) < 0:
            lo = mid
        else:
            hi = mid
    return 1.0 / math.exp(0.5 * (lo + hi))


def apply_temperature(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(log probs / T)`` (N, K), float32; zero-probability classes stay 0."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    return torch.softmax(_log_probs(probs) / temperature, dim=-1).to(torch.float32)
