"""The one post-training evaluation, used by every entry point (``train``, ``train --workers``,
``compare``, a search trial, ``eval``).

Given the trained members of a run (one adapter/head pair; several for an ensemble), it

1. fits the method's post-hoc head if it has one (``laplace``: once, on the final training features);
2. predicts the validation, evaluation and OOD splits with the method's predictive
   (``polar_vbll.methods.PREDICTIVES``);
3. turns the predictions into one metrics block: ACC/ECE/NLL/Brier per split, the zero-shot model's on
   the evaluation split, and per OOD set its metrics plus AUROC of separating it from the evaluation split
   by max-probability and by predictive entropy.

Features come through a :class:`~polar_vbll.protocols.FeatureProvider`, so the same code runs in one
process and on workers (where every rank computes its shard and the rows are gathered).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from polar_vbll.config import RunConfig
from polar_vbll.errors import RunFailure
from polar_vbll.features import EncodedSplit
from polar_vbll.methods import METHODS
from polar_vbll.metrics import ood_auroc, ood_scores
from polar_vbll.predictives import Predictions
from polar_vbll.protocols import FeatureProvider

#: The metric keys of a split, as fractions (ACC and ECE are shown in percent by the reports).
SPLIT_KEYS = ("acc", "ece", "nll", "brier", "n")


@dataclass
class Member:
    """One trained adapter/head pair. ``adapter_state`` is None for the adapter as it stands in the model
    (every single-member method); an ensemble keeps each member's state to swap in."""

    head: Any
    adapter_state: dict[str, torch.Tensor] | None = None


@dataclass
class PredictContext:
    """What a predictive needs besides the split (``polar_vbll.methods.PredictiveKind.predict``)."""

    cfg: RunConfig
    provider: FeatureProvider
    adapter: Any
    members: list[Member]
    batch_size: int
    progress: bool


@dataclass
class Evaluation:
    """Predictions of every evaluated split (``validation``, ``eval``, ``ood:<task>``), the zero-shot
    model's on the evaluation split (None when not computed), backbone passes per example, and the
    seconds each split's prediction took."""

    predictions: dict[str, Predictions]
    zero_shot: Predictions | None
    passes: int
    seconds: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, Any]:
        """The metrics block of ``results.json`` (see ``polar_vbll.results.Metrics``)."""
        preds = self.predictions
        out: dict[str, Any] = {
            "eval": preds["eval"].metrics(),
            "validation": preds["validation"].metrics() if "validation" in preds else None,
            "zero_shot": self.zero_shot.metrics() if self.zero_shot is not None else None,
            "ood": {},
        }
        scores_in = ood_scores(preds["eval"].probs)
        for name, p in preds.items():
            if not name.startswith("ood:"):
                continue
            scores_out = ood_scores(p.probs)
            out["ood"][name.removeprefix("ood:")] = {
                **p.metrics(),
                "auroc_msp": ood_auroc(scores_in["msp"], scores_out["msp"]),
                "auroc_entropy": ood_auroc(scores_in["entropy"], scores_out["entropy"]),
            }
        return out


def posthoc_members(
    cfg: RunConfig, provider: FeatureProvider, adapter, members: list[Member], train: EncodedSplit
) -> list[Member]:
    """The members with the method's post-hoc head fitted (each on its own final training features),
    or the members unchanged when the head kind has no post-hoc step."""
    fit = METHODS[cfg.method].head_kind.posthoc
    if fit is None:
        return members
    bs = cfg.train.eval_batch_size
    out = []
    for m in members:
        saved = None
        if m.adapter_state is not None:
            saved = adapter.adapter_state_dict()
            adapter.load_adapter_state_dict(m.adapter_state, where="an ensemble member")
        try:
            phi = provider.split_features(train, bs)
        finally:
            if saved is not None:
                adapter.load_adapter_state_dict(saved, where="the adapter's own state")
        out.append(Member(fit(cfg, m.head, phi, train.labels, train.n_choices), m.adapter_state))
    return out


def evaluate(
    cfg: RunConfig,
    provider: FeatureProvider,
    adapter,
    members: list[Member],
    splits: dict[str, EncodedSplit],
    zero_shot_probs: torch.Tensor | None = None,
    progress: bool = True,
) -> Evaluation:
    """Predict the validation (when given), evaluation and OOD splits of a trained run with its method's
    predictive (post-hoc head fitted first); ``zero_shot_probs`` are the zero-shot model's probabilities on
    the evaluation split, ``(N, K)``, computed before training (the adapters at init are exactly ``W0``)."""
    method = METHODS[cfg.method]
    members = posthoc_members(cfg, provider, adapter, members, splits["train"])
    ctx = PredictContext(cfg, provider, adapter, members, cfg.train.eval_batch_size, progress)
    names = [n for n in ("validation", "eval") if n in splits] + [n for n in splits if n.startswith("ood:")]
    preds: dict[str, Predictions] = {}
    seconds: dict[str, float] = {}
    for name in names:
        t = time.perf_counter()
        preds[name] = method.predictive_kind.predict(ctx, splits[name])
        seconds[name] = time.perf_counter() - t
        if not torch.isfinite(preds[name].probs).all():
            raise RunFailure(
                f"{method.label}'s predictions on the {name} split are not finite (a diverged or overflowing "
                "model; with model.dtype bfloat16 try float32)"
            )
    zero = None
    if zero_shot_probs is not None:
        zero = Predictions(splits["eval"].name, zero_shot_probs.to(torch.float32), splits["eval"].labels.clone())
    return Evaluation(preds, zero, method.predictive_kind.passes(cfg), seconds)
