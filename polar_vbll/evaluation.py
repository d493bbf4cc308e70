"""The one post-training evaluation, used by every entry point (``train``, ``train --workers``,
``compare``, a search trial, ``eval``).

Given the trained members of a run (one adapter/head pair; several for an ensemble), it

1. fits the method's post-hoc head if it has one (``laplace``: once, on the final training features);
2. predicts the validation, evaluation and OOD splits with the method's predictive
   (``polar_vbll.methods.PREDICTIVES``);
3. turns the predictions into one metrics block: ACC/ECE/NLL/Brier, the mean logit variance and the
   mean epistemic score per split, the zero-shot model's metrics on the evaluation split, per OOD set its
   metrics plus AUROC of separating it from the evaluation split by max-probability, predictive entropy
   and the epistemic score; the honesty guard (``polar_vbll.guards``: the uniform and majority-class
   predictors on the evaluation split, chance accuracy, and whether this method is at chance); and, with
   ``eval.temperature_scaling``, the same block after temperature scaling fitted on validation
   (``polar_vbll.temperature``).

Features come through a :class:`~polar_vbll.protocols.FeatureProvider`, so the same code runs in one
process and on workers (where every rank computes its shard and the rows are gathered).
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from polar_vbll.config import RunConfig
from polar_vbll.errors import RunFailure
from polar_vbll.features import EncodedSplit
from polar_vbll.guards import at_chance, chance_reference
from polar_vbll.methods import METHODS
from polar_vbll.metrics import ood_auroc, ood_scores
from polar_vbll.peak import PeakMemory
from polar_vbll.predictives import Predictions
from polar_vbll.protocols import FeatureProvider
from polar_vbll.temperature import apply_temperature, fit_temperature

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
    model's on the evaluation split (None when not computed), backbone passes per example, the seconds
    each split's prediction took, the guard block of the evaluation split (``polar_vbll.guards``), and
    with temperature scaling its temperature and the scaled predictions of the same splits."""

    predictions: dict[str, Predictions]
    zero_shot: Predictions | None
    passes: int
    seconds: dict[str, float] = field(default_factory=dict)
    chance: dict[str, Any] | None = None
    temperature: float | None = None
    scaled: dict[str, Predictions] = field(default_factory=dict)
    cfg: RunConfig | None = None  # with n_choices: the decision rule's metrics (decision_block)
    n_choices: dict[str, torch.Tensor] | None = None
    posterior: dict[str, Any] | None = None  # the predictive's post-hoc step's report (TFB's search)
    jensen_gap: dict[str, Any] | None = None  # a VBLL head's bound vs its Monte Carlo data term (training split)
    # per split, the predictive's seconds without the cheap path's frozen-prefix pass (``seconds``: with it)
    predict_seconds: dict[str, float] = field(default_factory=dict)
    peak_memory: dict[str, Any] | None = None  # while the evaluation split was predicted (polar_vbll.peak)

    def metrics(self) -> dict[str, Any]:
        """The metrics block of ``results.json`` (see ``polar_vbll.results.Metrics``)."""
        out = _block(self.predictions, self.cfg, self.n_choices)
        out["zero_shot"] = self.zero_shot.metrics() if self.zero_shot is not None else None
        if self.chance is not None:
            out["chance"] = {**self.chance, "at_chance": at_chance(out["eval"]["acc"], self.chance)}
        out["temperature_scaled"] = (
            {"temperature": self.temperature, **_block(self.scaled, self.cfg, self.n_choices)}
            if self.temperature is not None
            else None
        )
        out["posterior"] = self.posterior
        out["jensen_gap"] = self.jensen_gap
        return out


def decision_block(
    cfg: RunConfig, preds: dict[str, Predictions], n_choices: dict[str, torch.Tensor]
) -> dict[str, Any] | None:
    """The run's decision rule (``cfg.decision``; ``polar_vbll.decisions``) calibrated on the validation
    split and applied to the evaluation split and the OOD sets: the confidence threshold and what it
    answers (fraction answered, their error rate), the conformal sets' empirical coverage and mean size
    (LAC, APS), and the fraction of each set the OOD flag raises. None without a validation split, or when
    it is too small for the conformal ``alpha``."""
    from polar_vbll.decisions.conformal import set_metrics
    from polar_vbll.decisions.rule import CalibrationData, DecisionRule, RuleSettings

    if "validation" not in preds:
        return None
    d = cfg.decision

    def eps(p: Predictions) -> torch.Tensor:
        return p.epistemic if p.epistemic is not None else torch.zeros(len(p.labels))

    val, ev = preds["validation"], preds["eval"]
    settings = RuleSettings(risk=d.risk, delta=d.delta, fwer=d.fwer, alpha=d.alpha, ood_pass=d.ood_pass,
                            thresholds=d.thresholds)  # fmt: skip
    try:
        rule = DecisionRule.fit(CalibrationData(val.probs, val.labels, n_choices["validation"], eps(val)), settings)
    except ValueError:
        return None
    dec = rule.decide(ev.probs, eps(ev), n_choices["eval"])
    answered = ~dec.abstain
    wrong = torch.as_tensor(dec.answer) != ev.labels
    flagged = {"eval": float(dec.ood.mean())}
    for name, p in preds.items():
        if name.startswith("ood:"):
            flagged[name.removeprefix("ood:")] = float(rule.decide(p.probs, eps(p), n_choices[name]).ood.mean())
    return {
        "risk_target": d.risk, "delta": d.delta, "alpha": d.alpha, "tau": rule.threshold.tau,
        "val_coverage": rule.threshold.coverage, "val_risk": rule.threshold.risk,
        "coverage": float(answered.mean()),
        "selective_risk": float(wrong[torch.as_tensor(answered)].double().mean()) if answered.any() else None,
        **{s: set_metrics(dec.sets[s], ev.labels) if s in dec.sets else None for s in ("lac", "aps")},
        "ood_score": rule.ood_score, "ood_flagged": flagged,
    }  # fmt: skip


def _block(preds: dict[str, Predictions], cfg: RunConfig | None = None,
           n_choices: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:  # fmt: skip
    """Per-split metrics, per OOD set its metrics and AUROCs against the evaluation split, and (given the
    config and the splits' choice counts) the decision rule's metrics."""
    out: dict[str, Any] = {
        "eval": preds["eval"].metrics(),
        "validation": preds["validation"].metrics() if "validation" in preds else None,
        "ood": {},
        "decision": decision_block(cfg, preds, n_choices) if cfg is not None and n_choices is not None else None,
    }
    ev = preds["eval"]
    scores_in = ood_scores(ev.probs)
    for name, p in preds.items():
        if not name.startswith("ood:"):
            continue
        scores_out = ood_scores(p.probs)
        epistemic = None
        if ev.epistemic is not None and p.epistemic is not None and bool(
            torch.cat([ev.epistemic, p.epistemic]).ne(0).any()
        ):  # a single deterministic model has no epistemic part to rank by
            epistemic = ood_auroc(ev.epistemic, p.epistemic)
        out["ood"][name.removeprefix("ood:")] = {
            **p.metrics(),
            "auroc_msp": ood_auroc(scores_in["msp"], scores_out["msp"]),
            "auroc_entropy": ood_auroc(scores_in["entropy"], scores_out["entropy"]),
            "auroc_epistemic": epistemic,
        }
    return out


def temperature_scaled(preds: dict[str, Predictions]) -> tuple[float, dict[str, Predictions]]:
    """The temperature fitted on ``preds["validation"]`` and every split's predictions scaled by it."""
    val = preds["validation"]
    t = fit_temperature(val.probs, val.labels)
    return t, {n: Predictions(p.split, apply_temperature(p.probs, t), p.labels.clone()) for n, p in preds.items()}


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
        # the float64 fit runs on the CPU (docs/method-choices.md, "Where the head fits run"), on a copy of
        # the trained head: the member's own head stays where it trains
        head = copy.deepcopy(m.head).to("cpu")
        out.append(Member(fit(cfg, head, phi.cpu(), train.labels, train.n_choices), m.adapter_state))
    return out


def jensen_gap(cfg: RunConfig, provider: FeatureProvider, members: list[Member], train: EncodedSplit
               ) -> dict[str, Any] | None:  # fmt: skip
    """The trained VBLL head's Jensen gap on the final training features (``VBLLHead.jensen_gap``: the bound
    the eta-phase minimised against a Monte Carlo estimate of the exact data term, ``head.vbll.mc_samples``
    draws seeded by ``head.vbll.mc_seed``); None for a head without one. One pass over the training split."""
    head = members[0].head
    if len(members) != 1 or not hasattr(head, "jensen_gap"):
        return None
    phi = provider.split_features(train, cfg.train.eval_batch_size)
    v = cfg.head.vbll
    return head.jensen_gap(phi.to(head.vbll_mean.device), train.labels, train.n_choices, n_samples=v.mc_samples,
                           seed=v.mc_seed or 0)  # fmt: skip


def prepare_predictive(
    cfg: RunConfig, ctx: PredictContext, splits: dict[str, EncodedSplit], report: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The method's predictive's post-hoc step (``PredictiveKind.fit``: TFB's variance search), run once on
    the trained model before it predicts; ``report``: a reloaded run's own (reused, not searched again).
    Returns the report, None for a predictive without one."""
    fit = METHODS[cfg.method].predictive_kind.fit
    return fit(ctx, splits, report) if fit is not None else None


def _device(provider: FeatureProvider) -> torch.device:
    """Where the backbone runs (the device whose peak memory the evaluation reports)."""
    return next(provider.model.parameters()).device


def evaluate(
    cfg: RunConfig,
    provider: FeatureProvider,
    adapter,
    members: list[Member],
    splits: dict[str, EncodedSplit],
    zero_shot_probs: torch.Tensor | None = None,
    progress: bool = True,
    temperature: float | None = None,
    posterior: dict[str, Any] | None = None,
) -> Evaluation:
    """Predict the validation (when given), evaluation and OOD splits of a trained run with its method's
    predictive (post-hoc head fitted first); ``zero_shot_probs`` are the zero-shot model's probabilities on
    the evaluation split, ``(N, K)``, computed before training (the adapters at init are exactly ``W0``).
    With ``eval.temperature_scaling`` the temperature is fitted on the validation split, or, without one
    (``polar-vbll eval`` on another task), ``temperature`` (the run's own) is applied when given. A predictive
    with a post-hoc step (TFB) runs it first, or reuses ``posterior``, the run's own report."""
    method = METHODS[cfg.method]
    gap = jensen_gap(cfg, provider, members, splits["train"])
    members = posthoc_members(cfg, provider, adapter, members, splits["train"])
    ctx = PredictContext(cfg, provider, adapter, members, cfg.train.eval_batch_size, progress)
    report = prepare_predictive(cfg, ctx, splits, posterior)
    names = [n for n in ("validation", "eval") if n in splits] + [n for n in splits if n.startswith("ood:")]
    preds: dict[str, Predictions] = {}
    seconds: dict[str, float] = {}
    predict_seconds: dict[str, float] = {}
    peak = None
    for name in names:
        t = time.perf_counter()
        provider.prepare(splits[name], ctx.batch_size, progress=progress)  # the cheap path's frozen blocks
        t_predict = time.perf_counter()
        with PeakMemory(_device(provider)) if name == "eval" else contextlib.nullcontext() as measured:
            preds[name] = method.predictive_kind.predict(ctx, splits[name])
        end = time.perf_counter()  # one reading: the prediction's time is part of the split's, never above it
        seconds[name], predict_seconds[name] = end - t, end - t_predict
        peak = measured.report() if measured is not None else peak
        if not torch.isfinite(preds[name].probs).all():
            raise RunFailure(
                f"{method.label}'s predictions on the {name} split are not finite (a diverged or overflowing "
                "model; with model.dtype bfloat16 try float32)"
            )
    zero = None
    if zero_shot_probs is not None:
        zero = Predictions(splits["eval"].name, zero_shot_probs.to(torch.float32), splits["eval"].labels.clone())
    ev, train = splits["eval"], splits["train"]
    chance = chance_reference(train.labels, ev.labels, ev.n_choices, preds["eval"].probs.shape[1])
    out = Evaluation(preds, zero, method.predictive_kind.passes(cfg), seconds, chance=chance, cfg=cfg,
                     n_choices={n: splits[n].n_choices for n in preds}, posterior=report,
                     jensen_gap=gap, predict_seconds=predict_seconds, peak_memory=peak)  # fmt: skip
    if cfg.eval.temperature_scaling:
        if "validation" in preds:
            out.temperature, out.scaled = temperature_scaled(preds)
        elif temperature is not None:  # another task's evaluation: the run's own temperature
            out.temperature = temperature
            out.scaled = {n: Predictions(p.split, apply_temperature(p.probs, temperature), p.labels.clone())
                          for n, p in preds.items()}  # fmt: skip
    return out
