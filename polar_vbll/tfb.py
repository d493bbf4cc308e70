"""TFB: training-free Bayesianization of a trained LoRA (Shi, Wang, Wang et al., NeurIPS 2025), the ``tfb``
predictive's post-hoc step. Written from the paper's description and its reference code
(Wang-ML-Lab/bayesian-peft, ``modelwrappers/tfblora.py``), the source of every formula below.

**The posterior.** Each trained LoRA layer ``W0 + s B A`` is read in the SVD basis of ``B``:
``B = U diag(d) V^T`` gives ``B' = U diag(d)`` and ``A' = V^T A`` (``B' A' = B A``: the same model). ``A'``
gets a Gaussian posterior ``N(A', sigma^2)`` with ``sigma_ij = lambda / (d_i + 1e-6)`` (one std per row,
shared by the row's ``in`` entries), sampled with BLoB's flipout forward (``polar_vbll.adapters.blob``). The
reference code rewrites the factors; here they stay as trained and the noise enters through ``B V``.

**The variance search.** ``lambda`` is the one number found: a bisection on ``[tfb.min_std, tfb.max_std]``
over ``tfb.iterations`` steps, on an anchor split (the training split by default). With ``y_hat`` the
deterministic model's predicted classes and ``NLL(lambda)`` the mean ``-log p(y_hat)`` under the
``tfb.search_samples``-pass predictive, the change is ``r = |NLL(lambda) - NLL(0)| / NLL(0)`` (``criterion:
relative``), divided once more by the anchor's size as the reference code does (``criterion: reference``, the
default). ``r > tfb.threshold``: ``lambda`` is kept as the best so far and the upper end moves down to it;
otherwise the lower end moves up. The result is the last ``lambda`` that exceeded the threshold (the upper
bound if none did), as in the reference. Every step is reported (``results.json`` ``metrics.posterior``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from polar_vbll.adapters.blob import attach_posteriors
from polar_vbll.adapters.lora import ADAPTER_NAME

#: Added to each singular value before dividing (the reference code's).
SINGULAR_EPS = 1e-6


@torch.no_grad()
def singular_bases(adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per LoRA layer path, the SVD of its ``B = U diag(d) V^T``: ``(d (r,), V (r, r))`` in float32. The factors
    are not rewritten: the posterior lives on ``V^T A`` and its noise enters through ``B V = U diag(d)``
    (``BlobPosterior.basis``), the same model and the same sampling distribution as the reference code's
    rewritten ``B' = U diag(d)``, ``A' = V^T A``; the saved adapter stays the trained one."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, layer in adapter.lora_layers():
        b = layer.lora_B[ADAPTER_NAME].weight
        _, d, vh = torch.linalg.svd(b.detach().to(torch.float64), full_matrices=False)
        out[name] = (d.to(torch.float32), vh.T.to(torch.float32))
    return out


@torch.no_grad()
def set_std_scale(adapter, bases: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float) -> None:
    """Set every layer's posterior std to ``scale / (d_i + 1e-6)`` on row ``i`` of ``V^T A`` (attaching the
    posteriors the first time); ``scale = 0`` is the deterministic model."""
    posts = attach_posteriors(adapter, eps=1.0)  # eps > 0: sigma = rho^2
    for post, (name, _) in zip(posts, adapter.lora_layers(), strict=True):
        d, v = (t.to(post.rho.device) for t in bases[name])
        post.basis = v
        post.rho.copy_((scale / (d + SINGULAR_EPS)).sqrt().unsqueeze(1).expand_as(post.rho))
        post.rho.requires_grad_(False)


def bisect(change: Callable[[float], float], low: float, high: float, threshold: float, iterations: int
           ) -> tuple[float, list[dict[str, float]]]:  # fmt: skip
    """The reference code's bisection (module docstring): ``(lambda, steps)``, each step ``{"std_scale",
    "change"}``. ``change`` must grow with ``lambda`` for the result to mean anything."""
    best, steps = high, []
    for _ in range(iterations):
        mid = (low + high) / 2
        r = change(mid)
        steps.append({"std_scale": mid, "change": r})
        if r > threshold:
            best, high = mid, mid
        else:
            low = mid
    return best, steps


def search(cfg, provider, adapter, head, anchor, batch_size: int, seed: int, progress: bool = False) -> dict[str, Any]:
    """Bayesianize ``adapter`` (a trained ``LoraAdapter``) in place by TFB's search on the ``anchor`` split
    (an ``EncodedSplit``), ``cfg`` a ``TfbConfig``. Returns the report (the std scale found, every step, the
    anchor's size and its deterministic NLL)."""
    from polar_vbll.predictives import predict, predict_mc_dropout

    bases = singular_bases(adapter)
    set_std_scale(adapter, bases, 0.0)
    p0 = predict(provider, head, anchor, batch_size, progress=progress).probs.to(torch.float64)
    y_hat = p0.argmax(-1)

    def nll(probs: torch.Tensor) -> float:
        return float(-torch.log(probs.to(torch.float64).gather(1, y_hat[:, None]) + 1e-12).mean())

    nll0 = nll(p0)
    n = len(anchor)

    def change(scale: float) -> float:
        set_std_scale(adapter, bases, scale)
        probs = predict_mc_dropout(provider, head, anchor, batch_size, n_samples=cfg.search_samples, seed=seed,
                                   progress=progress).probs  # fmt: skip
        r = abs(nll(probs) - nll0) / max(nll0, 1e-12)
        return r / n if cfg.criterion == "reference" else r

    best, steps = bisect(change, cfg.min_std, cfg.max_std, cfg.threshold, cfg.iterations)
    set_std_scale(adapter, bases, best)
    return {"method": "tfb", "std_scale": best, "steps": steps, "anchor": cfg.anchor, "anchor_size": n,
            "anchor_nll": nll0, "criterion": cfg.criterion,
            "min_singular": min(float(d.min()) for d, _ in bases.values()) if bases else math.nan}  # fmt: skip


def apply(adapter, report: dict[str, Any]) -> dict[str, Any]:
    """Set ``adapter``'s posterior from a finished search's ``report`` (a reloaded run: ``eval``, ``predict``
    reuse the scale the run found rather than searching again)."""
    set_std_scale(adapter, singular_bases(adapter), float(report["std_scale"]))
    return report
