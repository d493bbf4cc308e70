"""Predictive class probabilities from Gaussian logits ``z_k ~ N(mean_k, var_k)`` (independent over k).

The VBLL head gives, per example, K Gaussian logits in closed form (one backbone pass). The predictive
``E[softmax(z)]`` has no closed form; two ways to get it ([choice] ``VBLLConfig.predictive``):

- ``mc_softmax``: average ``softmax`` over S samples of the K logits (samples of K numbers, not of the
  backbone, so S=1000 costs nothing next to a forward pass). Unbiased; standard error ~ 0.5 / sqrt(S).
- ``probit_softmax``: the multiclass probit approximation ``softmax(mean_k / sqrt(1 + pi/8 * var_k))``
  (MacKay 1992's probit approximation applied per logit, as in Kristiadi, Hein, Hennig 2020).
  Deterministic and exact when every variance is zero; it treats each logit separately, so
  it is a heuristic for K > 2 and is biased for large variances.

Masked (padding) classes arrive with ``mean = -inf`` and ``var = 0``: both functions then give them
probability exactly 0.
"""

from __future__ import annotations

import math

import torch

#: Largest number of logit samples held at once (S_chunk * B * K elements), to bound memory on big batches.
_MAX_SAMPLE_ELEMENTS = 1 << 24


def standard_normal_samples(
    n_samples: int, num_classes: int, seed: int | None, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``(S, K)`` standard normal draws. With a seed they come from a private CPU generator, so they are the
    same on every device and do not disturb (or depend on) the global RNG; then moved to ``device``.
    Drawn class by class (one ``randn(S)`` call each), so the draws of class k do not depend on K: a
    3-choice question gets the same probabilities from a head padded to K=5 as from a 3-class head."""
    if seed is None:
        return torch.randn(num_classes, n_samples, dtype=dtype, device=device).T
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    draws = [torch.randn(n_samples, generator=gen, dtype=dtype) for _ in range(num_classes)]
    return torch.stack(draws, dim=1).to(device)


def mc_softmax(mean: torch.Tensor, var: torch.Tensor, n_samples: int, seed: int | None = 0) -> torch.Tensor:
    """Monte Carlo predictive ``(1/S) sum_s softmax(mean + sqrt(var) * eps_s)``, ``eps_s ~ N(0, I_K)``.

    The same S draws ``eps_s`` are used for every row of the batch (common random numbers): an example's
    probabilities then depend only on its own logit moments and the seed, not on which batch or position
    it was evaluated in, so evaluation is reproducible under any batching. Each row's estimate is still
    an unbiased S-sample average.
    """
    if n_samples <= 0:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    b, k = mean.shape
    eps = standard_normal_samples(n_samples, k, seed, mean.dtype, mean.device)
    std = var.sqrt()
    total = torch.zeros_like(mean)
    chunk = max(1, _MAX_SAMPLE_ELEMENTS // max(1, b * k))
    for e in eps.split(chunk):
        z = mean.unsqueeze(0) + std.unsqueeze(0) * e.unsqueeze(1)  # (s, B, K); -inf stays -inf (std 0)
        total = total + torch.softmax(z, dim=-1).sum(0)
    return total / n_samples


def probit_softmax(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Probit approximation ``softmax(mean / sqrt(1 + pi/8 * var))``; equals ``softmax(mean)`` at var=0."""
    return torch.softmax(mean / torch.sqrt(1.0 + (math.pi / 8.0) * var), dim=-1)


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """``-sum_k p_k log p_k`` per row, with ``0 log 0 = 0`` (masked classes contribute nothing)."""
    return -torch.special.xlogy(probs, probs).sum(-1)


def mutual_information(probs: torch.Tensor) -> torch.Tensor:
    """Epistemic uncertainty as the mutual information between the label and the parameters (BALD;
    Houlsby et al. 2011), from S samples of the predictive ``probs`` (S, B, K): the entropy of the mean
    minus the mean entropy, in nats, (B,), clamped at 0 against round-off."""
    return (predictive_entropy(probs.mean(0)) - predictive_entropy(probs).mean(0)).clamp_min(0.0)


def mean_valid(values: torch.Tensor, n_choices: torch.Tensor) -> torch.Tensor:
    """(B, K) -> (B,): the mean over each row's first ``n_choices`` classes."""
    valid = torch.arange(values.shape[-1], device=values.device).unsqueeze(0) < n_choices.unsqueeze(1)
    return (values * valid).sum(-1) / valid.sum(-1)


def gaussian_mutual_information(
    mean: torch.Tensor, std: torch.Tensor, n_samples: int, seed: int | None = 0
) -> torch.Tensor:
    """:func:`mutual_information` of softmax over independent Gaussian logits ``N(mean, std^2)`` (B, K),
    with the same seeded draws for every row (as :func:`mc_softmax`); masked classes (mean -inf, std 0)
    get probability 0 in every sample."""
    b, k = mean.shape
    eps = standard_normal_samples(n_samples, k, seed, mean.dtype, mean.device)
    total = torch.zeros(b, dtype=mean.dtype, device=mean.device)
    mean_p = torch.zeros_like(mean)
    chunk = max(1, _MAX_SAMPLE_ELEMENTS // max(1, b * k))
    for e in eps.split(chunk):
        p = torch.softmax(mean.unsqueeze(0) + std.unsqueeze(0) * e.unsqueeze(1), dim=-1)
        mean_p = mean_p + p.sum(0)
        total = total + predictive_entropy(p).sum(0)
    return (predictive_entropy(mean_p / n_samples) - total / n_samples).clamp_min(0.0)
