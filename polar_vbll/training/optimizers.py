"""The adapter optimizers: a Stiefel optimizer for U, V (landing or Riemannian, batched by shape) and AdamW
for the Euclidean parameters (Theta, or LoRA's A and B), as every backend and the benchmarks build them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polar_vbll.config import OptimConfig
from polar_vbll.optim import StiefelOptimizer
from polar_vbll.protocols import AdapterModel


def build_stiefel_optimizer(adapter: AdapterModel, cfg: OptimConfig) -> StiefelOptimizer | None:
    """The Stiefel optimizer for U, V (None for adapters without Stiefel factors, e.g. LoRA)."""
    factors = list(adapter.stiefel_parameters())
    if not factors:
        return None
    return StiefelOptimizer(
        factors,
        lr=cfg.lr_stiefel,
        method=cfg.method,
        retraction=cfg.retraction,
        betas=cfg.betas,
        eps=cfg.eps,
        landing_lambda=cfg.landing_lambda,
        second_moment=cfg.second_moment,
        landing_safe_distance=cfg.landing_safe_distance,
    )


#: A landing run that ends farther than this from the manifold (``max ||X^T X - I||_F``) is warned about when
#: it has no safeguard of its own (``optim.landing_safe_distance: null``); the safeguard's default bound.
ORTHOGONALITY_BOUND = 0.1


def off_manifold_warning(cfg: OptimConfig, error: float, steps: int) -> str | None:
    """The warning for a landing run whose U, V ended above their bound (``optim.landing_safe_distance``, or
    :data:`ORTHOGONALITY_BOUND` without a safeguard), with the numbers and what to change; None otherwise
    (and for the retraction, which keeps ~1e-6)."""
    if cfg.method != "landing":
        return None
    bound = cfg.landing_safe_distance if cfg.landing_safe_distance is not None else ORTHOGONALITY_BOUND
    if not error > bound * (1 + 1e-3):  # the safeguard's own fp32 arithmetic may land a hair above
        return None
    unguarded = cfg.landing_safe_distance is None
    guard = "set optim.landing_safe_distance (the step safeguard; default 0.1), " if unguarded else ""
    return (
        f"the landing field left U, V at max ||U^T U - I||_F = {error:.3g} after {steps} steps (bound {bound:g}, "
        f"lr_stiefel {cfg.lr_stiefel:g}); {guard}lower optim.lr_stiefel, or use optim.method=riemannian "
        "(docs/method-choices.md)"
    )


def build_theta_optimizer(params: Sequence[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW for the Euclidean adapter parameters (Theta, or LoRA's A and B); weight decay > 0 is MAP.
    Fused (one kernel for every parameter, no host work per tensor) when the parameters are on CUDA; the
    CPU keeps torch's default implementation, whose results the tests pin."""
    params = list(params)
    fused = bool(params) and all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(
        params, lr=cfg.lr_theta, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.theta_weight_decay,
        **({"fused": True} if fused else {}),
    )  # fmt: skip


def build_optimizers(adapter: AdapterModel, cfg: OptimConfig) -> tuple[StiefelOptimizer | None, torch.optim.AdamW]:
    """Both adapter optimizers (the pair a hand-written loop needs, e.g. the benchmarks)."""
    return build_stiefel_optimizer(adapter, cfg), build_theta_optimizer(adapter.theta_parameters(), cfg)
