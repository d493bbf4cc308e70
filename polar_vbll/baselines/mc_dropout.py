"""MC dropout (Gal & Ghahramani 2016) on the adapters: average the predictive over stochastic passes.

At test time the backbone stays in eval mode while the *adapter* dropout (peft's ``lora_dropout`` or
``PolarLinear.polar_dropout``) is switched on (:func:`~polar_vbll.baselines.lora.set_adapter_dropout`),
and ``n_samples`` passes with independent masks are averaged in probability space:
``p(y|x) ~= (1/S) sum_s softmax(z_s)``.

Cost: every sample is a backbone pass, so this baseline costs ``n_samples`` (10 in the protocol) passes per
example, against 1 for MLE/MAP, Laplace and PoLAR-VBLL. On the cached-prefix path
(``FeatureSource(cache_prefix=True)``) a pass runs only the adapted top blocks: the frozen blocks below carry
no adapter, hence no dropout, so their cached outputs are the same for every sample. That is why the
sampler takes a *callable producing phi for one batch* rather than a model: it works on either path.

Reproducibility: dropout draws from the global RNG (``nn.Dropout`` takes no generator). A ``seed`` runs the
whole prediction under :func:`~polar_vbll.baselines.lora.seeded_rng` (CPU and CUDA generators seeded,
restored afterwards): the same seed, batch size and split give the same probabilities, and the caller's
random stream is left untouched.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from polar_vbll.baselines.lora import adapter_dropout, seeded_rng
from polar_vbll.evaluate import Predictions
from polar_vbll.features import EncodedSplit, FeatureSource, length_sorted_batches

#: Samples (= backbone passes) per example in the BLoB protocol.
DEFAULT_MC_SAMPLES = 10


def _warn_if_deterministic(n_active: int) -> None:
    if n_active == 0:
        warnings.warn(
            "MC dropout: the model has no adapter dropout with p > 0, so every sample is the same "
            "deterministic pass (set the adapter's `dropout` > 0 to get an MC-dropout predictive)",
            stacklevel=3,
        )


@torch.no_grad()
def mc_dropout_predict(
    feature_fn: Callable[[], torch.Tensor],
    head,
    n_choices: torch.Tensor,
    n_samples: int = DEFAULT_MC_SAMPLES,
    *,
    model: nn.Module | None = None,
    seed: int | None = None,
    return_samples: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The MC-dropout predictive ``(B, K)`` of one batch: the mean of ``head.predict_proba`` over
    ``n_samples`` calls of ``feature_fn`` (each a stochastic backbone pass giving phi ``(B, d)``).

    ``model``: when given, its adapter dropout is switched on for the passes and restored afterwards;
    otherwise the caller must have done it (e.g. :func:`predict_mc_dropout` does it once per split).
    ``seed``: when given, the passes run under a seeded, forked RNG (reproducible); when None they consume
    the current global random stream. ``return_samples`` also returns the per-sample probabilities
    ``(n_samples, B, K)``. Probabilities are averaged in float64 and returned as float32.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    with contextlib.ExitStack() as stack:
        if seed is not None:
            stack.enter_context(seeded_rng(seed))
        if model is not None:
            _warn_if_deterministic(stack.enter_context(adapter_dropout(model, True)))
        samples = []
        for _ in range(n_samples):
            phi = feature_fn()
            samples.append(head.predict_proba(phi, n_choices.to(phi.device)).to(torch.float64))
    stacked = torch.stack(samples)
    mean = stacked.mean(dim=0).to(torch.float32)
    if return_samples:
        return mean, stacked.to(torch.float32)
    return mean


@torch.no_grad()
def predict_mc_dropout(
    source: FeatureSource,
    head,
    enc: EncodedSplit,
    batch_size: int,
    n_samples: int = DEFAULT_MC_SAMPLES,
    seed: int = 0,
    progress: bool = True,
) -> Predictions:
    """Like :func:`polar_vbll.evaluate.predict`, with the MC-dropout predictive: ``n_samples`` stochastic
    passes per batch (adapted blocks only on the cached-prefix path), adapter dropout on, backbone in eval
    mode. The frozen prefix is prepared first, outside the seeded block, so the result does not depend on
    whether the cache was already filled. Returns the same :class:`Predictions` as ``predict``.
    """
    source.prepare(enc, batch_size, progress=progress)
    probs = torch.zeros((len(enc), head.num_classes), dtype=torch.float32)
    batches = list(length_sorted_batches([len(s) for s in enc.ids], batch_size))
    with seeded_rng(seed), adapter_dropout(source.model, True) as n_active:
        _warn_if_deterministic(n_active)
        for idx in tqdm(batches, desc=f"MC dropout x{n_samples} on {enc.name}", disable=not progress):
            p = mc_dropout_predict(
                lambda idx=idx: source.features(enc, idx), head, enc.n_choices[idx], n_samples=n_samples
            )
            probs[idx] = p.cpu()
    return Predictions(enc.name, probs, enc.labels.clone())
