"""Methods as data: registries of adapter kinds, head kinds and predictives, and the named methods that
combine them.

A *method* (``RunConfig.method``) is one entry of :data:`METHODS`: an adapter kind from :data:`ADAPTERS`
(``polar``, ``lora``), a head kind from :data:`HEADS` (``deterministic``, ``vbll``, ``laplace``), a
predictive from :data:`PREDICTIVES` (``one_pass``, ``mc_dropout``, ``ensemble``), the config values the
method sets unless the config gives them (``defaults``) and a cross-field check. The config is validated
against its method once, when it is parsed (``polar_vbll.config``); every entry point then either runs the
method or refuses it with a one-line error (``polar_vbll.support``).

To add a method: add a :class:`Method` here. To add a kind of adapter, head or predictive: implement the
protocol (``polar_vbll.protocols``), add a kind here, and list its settings in the config. Nothing else
changes: the trainer, the evaluation and every entry point read these tables.

Builders import their implementation when called, so importing this module (which the config does) stays
cheap and free of import cycles.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from polar_vbll.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from polar_vbll.config import RunConfig
    from polar_vbll.protocols import AdapterModel, Head


# ------------------------------------------------------------------------------------------- adapters
@dataclass(frozen=True)
class AdapterKind:
    """An adapter kind: the config section holding its settings, and how to inject or reload it."""

    name: str
    label: str
    section: str  # the RunConfig section with this kind's settings
    inject: Callable[[nn.Module, Any], AdapterModel]  # (base model, section config) -> adapter
    load: Callable[[nn.Module, Path], AdapterModel]  # (fresh base model, saved directory) -> adapter
    select: Callable[[nn.Module, Any], list] | None = None  # (model, section config) -> the layers it adapts
    stiefel: bool = False  # has factors on a Stiefel manifold (the optim.*_stiefel settings act on them)
    # steps its own posterior parameters in place after the theta step (BLoB's second optimizer,
    # ``variational_step``): on workers only where every rank holds the whole adapter (ZeRO stage 0)
    posterior_step: bool = False

    def settings(self, cfg: RunConfig) -> Any:
        return getattr(cfg, self.section)


def _lazy(target: str) -> Callable[..., Any]:
    """``module:attr[.attr]``, imported when first called (so importing this module stays cheap and free of
    import cycles): the builders of the adapter kinds below."""
    module, _, name = target.partition(":")

    def call(*args: Any) -> Any:
        import importlib

        obj: Any = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj(*args)

    call.__qualname__ = call.__name__ = target
    return call


_POLAR, _LORA, _BLOB = "polar_vbll.adapters.model", "polar_vbll.adapters.lora", "polar_vbll.adapters.blob"


ADAPTERS: Mapping[str, AdapterKind] = MappingProxyType(
    {
        "polar": AdapterKind("polar", "PoLAR", "polar", _lazy(f"{_POLAR}:inject_polar"),
                             _lazy(f"{_POLAR}:PolarModel.load_adapter"), _lazy(f"{_POLAR}:select_targets"),
                             stiefel=True),
        "lora": AdapterKind("lora", "LoRA", "lora", _lazy(f"{_LORA}:LoraAdapter"),
                            _lazy(f"{_LORA}:LoraAdapter.load_adapter"), _lazy(f"{_LORA}:_select_targets")),
        # LoRA with a Gaussian posterior on A (polar_vbll.adapters.blob); selects layers as LoRA does
        "blob": AdapterKind("blob", "BLoB", "blob", _lazy(f"{_BLOB}:BlobAdapter"),
                            _lazy(f"{_BLOB}:BlobAdapter.load_adapter"), _lazy(f"{_LORA}:_select_targets"),
                            posterior_step=True),
        # PoLAR with BLoB's posterior on Theta (polar_vbll.adapters.blob.PolarBlobAdapter)
        "polar_blob": AdapterKind("polar_blob", "PoLAR-BLoB", "polar_blob", _lazy(f"{_BLOB}:PolarBlobAdapter"),
                                  _lazy(f"{_BLOB}:PolarBlobAdapter.load_adapter"), _lazy(f"{_POLAR}:select_targets"),
                                  stiefel=True, posterior_step=True),
    }
)


# ---------------------------------------------------------------------------------------------- heads
@dataclass(frozen=True)
class HeadKind:
    """A head kind. ``build`` makes the head that trains (from the LM-head rows of the answer letters, so
    training starts at the zero-shot model); ``training`` says what moves it: ``frozen`` (nothing),
    ``eta`` (the eta-phase of the alternating optimization: the head coordinator fits it on fixed
    features) or ``theta`` (the theta-phase's gradient step, jointly with the adapters); ``posthoc``
    (optional) turns the trained head into the head that predicts, fitted once on the final training
    features."""

    name: str
    build: Callable[[RunConfig, torch.Tensor, torch.Tensor | None, int], Head]
    training: Literal["frozen", "eta", "theta"]
    posthoc: Callable[[RunConfig, Head, torch.Tensor, torch.Tensor, torch.Tensor], Head] | None = None
    trains_as: str | None = None  # the kind whose training this one shares (laplace: linear)
    settings: tuple[str, ...] = ()  # the head.* sections that change what is trained
    post_settings: tuple[str, ...] = ()  # the head.* sections its post-hoc step reads (not what is trained)

    @property
    def reads(self) -> tuple[str, ...]:
        """Every head.* section this kind reads, in training or after it (``polar_vbll.support``)."""
        return self.settings + self.post_settings

    @property
    def training_kind(self) -> str:
        return self.trains_as or self.name

    @property
    def refitted(self) -> bool:
        """Fitted by the eta-phase (the head coordinator)."""
        return self.training == "eta"


def _deterministic(cfg, weight, bias, n_train):
    from polar_vbll.heads.deterministic import DeterministicHead

    return DeterministicHead(weight, bias)


def _linear(cfg, weight, bias, n_train):
    from polar_vbll.heads.linear import LinearHead

    lin = cfg.head.linear
    return LinearHead(weight, bias, dataset_size=n_train, features=cfg.head.features, prior=lin.prior,
                      prior_scale=lin.prior_scale)  # fmt: skip


def _vbll(cfg, weight, bias, n_train):
    from polar_vbll.heads.vbll import VBLLHead

    return VBLLHead.from_weight(weight, dataset_size=n_train, config=cfg.head.vbll, features=cfg.head.features)


def _fit_laplace(cfg, head, phi, labels, n_choices):
    import torch

    from polar_vbll.errors import HeadFitDiverged
    from polar_vbll.heads.laplace import LastLayerLaplace

    lap = cfg.head.laplace
    if not torch.isfinite(phi).all():
        raise HeadFitDiverged("the post-hoc Laplace head cannot be fitted: the training features are not finite")
    try:
        prior_precision = None  # trained: chosen by the evidence around the trained head
        if lap.mean == "map":
            from polar_vbll.heads.probe import fit_probe

            head = fit_probe(head, phi, labels, n_choices, cfg.head.fit, structure=lap.structure)
            prior_precision = 1.0 / head.prior_var  # the prior the mode was fitted under
        return LastLayerLaplace.from_head(
            head, structure=lap.structure, predictive=lap.predictive, n_samples=lap.mc_samples, seed=lap.mc_seed,
            prior_precision=prior_precision,
        ).fit(phi, labels, n_choices)
    except torch.linalg.LinAlgError as exc:
        raise HeadFitDiverged(
            f"the post-hoc Laplace fit failed ({exc}); try head.laplace.structure: kron"
        ) from None


def _fit_laplace_at_vbll(cfg, head, phi, labels, n_choices):
    """The paper's hybrid (``polar_vbll_la``): last-layer Laplace centred at the trained VBLL head's mean
    rows (on the head's own features, bias column included), prior precision by the evidence there."""
    import torch

    from polar_vbll.errors import HeadFitDiverged
    from polar_vbll.heads.laplace import LastLayerLaplace

    lap = cfg.head.laplace
    if not torch.isfinite(phi).all():
        raise HeadFitDiverged("the post-hoc Laplace head cannot be fitted: the training features are not finite")
    try:
        return LastLayerLaplace(
            head.vbll_mean, None, feature_map=head.feature_map, structure=lap.structure,
            predictive=lap.predictive, n_samples=lap.mc_samples, seed=lap.mc_seed,
        ).fit(phi, labels, n_choices)  # fmt: skip
    except torch.linalg.LinAlgError as exc:
        raise HeadFitDiverged(
            f"the post-hoc Laplace fit failed ({exc}); try head.laplace.structure: kron"
        ) from None


def _fit_probe(cfg, head, phi, labels, n_choices):
    from polar_vbll.heads.probe import fit_probe

    return fit_probe(head, phi, labels, n_choices, cfg.head.fit, structure=cfg.head.laplace.structure)


HEADS: Mapping[str, HeadKind] = MappingProxyType(
    {
        "deterministic": HeadKind("deterministic", _deterministic, "frozen"),
        "linear": HeadKind("linear", _linear, "theta", settings=("features", "linear")),
        "vbll": HeadKind("vbll", _vbll, "eta", settings=("features", "vbll", "fit")),
        # last-layer Laplace on the trained linear head's final features (head.laplace.mean: map refit or as trained)
        "laplace": HeadKind("laplace", _linear, "theta", posthoc=_fit_laplace, trains_as="linear",
                            settings=("features", "linear"), post_settings=("laplace", "fit")),  # fmt: skip
        # last-layer Laplace centred at the trained VBLL head's mean (the paper's PoLAR-VBLL + LA hybrid)
        "vbll_la": HeadKind("vbll_la", _vbll, "eta", posthoc=_fit_laplace_at_vbll, trains_as="vbll",
                            settings=("features", "vbll", "fit"), post_settings=("laplace",)),  # fmt: skip
        # a MAP linear head fitted once on the final (for a method that does not train: frozen) features
        "probe": HeadKind("probe", _linear, "frozen", posthoc=_fit_probe, settings=("features",),
                          post_settings=("laplace", "fit")),  # fmt: skip
    }
)


# ----------------------------------------------------------------------------------------- predictives
@dataclass(frozen=True)
class PredictiveKind:
    """How test-time probabilities are made, and what they cost: ``passes`` backbone passes per example,
    ``members`` independently trained adapter/head pairs (an ensemble trains several). ``predict(ctx,
    enc)`` gives the :class:`~polar_vbll.predictives.Predictions` of a split, where ``ctx`` is a
    :class:`~polar_vbll.evaluation.PredictContext` (features, adapter, trained members, settings)."""

    name: str
    passes: Callable[[RunConfig], int]
    members: Callable[[RunConfig], int]
    predict: Callable[[Any, Any], Any]
    # the config fields (or ``section.`` prefixes) only this predictive reads (``polar_vbll.support.used_by``)
    settings: tuple[str, ...] = ()
    # a post-hoc step on the trained model before it predicts: ``fit(ctx, splits, report)`` with the run's
    # splits by name and a saved report (a reloaded run: reuse it), returning the report (results.json
    # ``metrics.posterior``)
    fit: Callable[[Any, Any, dict[str, Any] | None], dict[str, Any]] | None = None


def _predict_one_pass(ctx, enc):
    from polar_vbll.predictives import predict

    return predict(ctx.provider, ctx.members[0].head, enc, ctx.batch_size, ctx.progress)


def _sampled(samples: Callable[[RunConfig], int]) -> Callable[[Any, Any], Any]:
    """A predictive of ``samples(cfg)`` passes with the adapters' noise on (dropout, posterior sampling),
    averaged (``polar_vbll.predictives.predict_mc_dropout``), seeded by ``train.seed``."""

    def predict(ctx, enc):
        from polar_vbll.predictives import predict_mc_dropout

        cfg = ctx.cfg
        return predict_mc_dropout(ctx.provider, ctx.members[0].head, enc, ctx.batch_size, n_samples=samples(cfg),
                                  seed=cfg.train.seed, progress=ctx.progress)  # fmt: skip

    return predict


def _predict_ensemble(ctx, enc):
    from polar_vbll.predictives import predict_ensemble

    members = [(m.adapter_state, m.head) for m in ctx.members]
    return predict_ensemble(ctx.adapter, ctx.provider, enc, ctx.batch_size, members, ctx.progress)


def _blob_samples(cfg) -> int:
    """The sampled passes of a BLoB-style adapter (``blob`` or ``polar_blob``): its section's eval_samples."""
    return METHODS[cfg.method].adapter_kind.settings(cfg).eval_samples


def _fit_tfb(ctx, splits, report):
    from polar_vbll import tfb

    if report is not None:
        return tfb.apply(ctx.adapter, report)
    cfg = ctx.cfg
    return tfb.search(cfg.tfb, ctx.provider, ctx.adapter, ctx.members[0].head, splits[cfg.tfb.anchor],
                      ctx.batch_size, cfg.train.seed, ctx.progress)  # fmt: skip


PREDICTIVES: Mapping[str, PredictiveKind] = MappingProxyType(
    {
        "one_pass": PredictiveKind("one_pass", lambda cfg: 1, lambda cfg: 1, _predict_one_pass),
        "mc_dropout": PredictiveKind(
            "mc_dropout", lambda cfg: cfg.eval.mc_dropout_samples, lambda cfg: 1,
            _sampled(lambda cfg: cfg.eval.mc_dropout_samples),
            settings=("eval.mc_dropout_samples",),
        ),
        "ensemble": PredictiveKind(
            "ensemble", lambda cfg: cfg.eval.ensemble_members, lambda cfg: cfg.eval.ensemble_members,
            _predict_ensemble, settings=("eval.ensemble_members",),
        ),  # fmt: skip
        # TFB: the trained LoRA Bayesianized post hoc (polar_vbll.tfb), then sampled passes
        "tfb": PredictiveKind("tfb", lambda cfg: cfg.tfb.eval_samples, lambda cfg: 1,
                              _sampled(lambda cfg: cfg.tfb.eval_samples),
                              settings=("tfb.",), fit=_fit_tfb),  # fmt: skip
        # BLoB: passes with the adapters' posterior sampling on, averaged (polar_vbll.adapters.blob)
        "blob": PredictiveKind("blob", _blob_samples, lambda cfg: 1, _sampled(_blob_samples)),
    }
)


# -------------------------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class Method:
    """A named combination of an adapter kind, a head kind and a predictive.

    ``trains``: False for the zero-shot model (its adapter stays at init, where ``W = W0`` exactly, so the
    cached frozen prefix is shared with the other methods). ``defaults``: config values the method sets
    unless the config gives them (a nested mapping, merged under the user's values). ``check``: a
    cross-field check of a parsed config, raising ``ValueError`` with the reason.
    """

    name: str
    label: str
    adapter: str
    head: str
    predictive: str
    description: str
    trains: bool = True
    defaults: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[RunConfig], None] | None = None

    @property
    def adapter_kind(self) -> AdapterKind:
        return ADAPTERS[self.adapter]

    @property
    def head_kind(self) -> HeadKind:
        return HEADS[self.head]

    @property
    def predictive_kind(self) -> PredictiveKind:
        return PREDICTIVES[self.predictive]


def _needs_weight_decay(cfg: RunConfig) -> None:
    _needs_head_prior(cfg)
    if cfg.optim.theta_weight_decay <= 0:
        raise ValueError(
            "lora_map is LoRA trained with AdamW weight decay (a Gaussian prior's MAP), but "
            "optim.theta_weight_decay is 0 (that is lora_mle); set it > 0"
        )


def _needs_dropout(cfg: RunConfig) -> None:
    kind = METHODS[cfg.method].adapter_kind
    if kind.settings(cfg).dropout <= 0:
        raise ValueError(
            f"mc_dropout averages passes with adapter dropout on, but {kind.section}.dropout is 0 (every "
            f"pass would be the same); set {kind.section}.dropout > 0"
        )


def _needs_head_prior(cfg: RunConfig) -> None:
    if cfg.head.linear.prior != "gaussian":
        raise ValueError(
            f"{cfg.method} is MAP: its linear head needs head.linear.prior gaussian, got "
            f"{cfg.head.linear.prior!r} (that is the MLE method)"
        )


def _needs_members(cfg: RunConfig) -> None:
    if cfg.eval.ensemble_members < 2:
        raise ValueError(f"an ensemble needs eval.ensemble_members >= 2, got {cfg.eval.ensemble_members}")


_TS = {"eval": {"temperature_scaling": True}}
_MAP = {"head": {"linear": {"prior": "gaussian"}}, "eval": {"temperature_scaling": True}}

METHODS: Mapping[str, Method] = MappingProxyType(
    {
        m.name: m
        for m in (
            Method(
                "zero_shot", "zero-shot", "polar", "deterministic", "one_pass",
                "the backbone as shipped: answer-letter logits of the LM head, no training", trains=False,
            ),
            Method(
                "linear_probe", "linear probe", "polar", "probe", "one_pass",
                "an L2 logistic regression (MAP, prior by the Laplace evidence) on the frozen backbone's "
                "features: is the signal there at all?", trains=False,
            ),
            Method(
                "polar_mle", "PoLAR-MLE", "polar", "linear", "one_pass",
                "PoLAR adapters and a trainable linear head (started at the LM-head rows), cross-entropy",
                defaults=_TS,
            ),
            Method(
                "polar_map", "PoLAR-MAP", "polar", "linear", "one_pass",
                "PoLAR adapters and a linear head under the VBLL head's Gaussian prior (MAP): the VBLL "
                "method without its posterior", defaults=_MAP, check=_needs_head_prior,
            ),
            Method(
                "polar_mle_frozen", "PoLAR-MLE (frozen rows)", "polar", "deterministic", "one_pass",
                "PoLAR adapters under the frozen answer-row head of the LM, cross-entropy", defaults=_TS,
            ),
            Method(
                "polar_vbll", "PoLAR-VBLL", "polar", "vbll", "one_pass",
                "PoLAR adapters and a variational Bayesian last layer, alternating optimization (ours)",
            ),
            Method(
                "polar_vbll_la", "PoLAR-VBLL + LA", "polar", "vbll_la", "one_pass",
                "PoLAR-VBLL, then last-layer Laplace centred at the VBLL head's mean (evidence prior): the "
                "paper's post-hoc refinement of the trained head",
            ),
            Method(
                "polar_laplace", "PoLAR-LL-Laplace", "polar", "laplace", "one_pass",
                "PoLAR-MLE's features plus last-layer Laplace (evidence prior; at the MAP refit, head.laplace.mean)",
            ),
            Method(
                "lora_mle", "LoRA-MLE", "lora", "linear", "one_pass",
                "LoRA (peft) and a trainable linear head, cross-entropy", defaults=_TS,
            ),
            Method(
                "lora_mle_frozen", "LoRA-MLE (frozen rows)", "lora", "deterministic", "one_pass",
                "LoRA (peft) under the frozen answer-row head of the LM, cross-entropy", defaults=_TS,
            ),
            Method(
                "lora_map", "LoRA-MAP", "lora", "linear", "one_pass",
                "LoRA with AdamW weight decay (a Gaussian prior's MAP) and a linear head under the Gaussian prior",
                defaults={"optim": {"theta_weight_decay": 0.1}, **_MAP}, check=_needs_weight_decay,
            ),
            Method(
                "mc_dropout", "MC dropout", "lora", "linear", "mc_dropout",
                "LoRA trained with adapter dropout; the predictive averages dropout passes at test time",
                defaults={"lora": {"dropout": 0.1}}, check=_needs_dropout,
            ),
            Method(
                "ensemble", "Deep ensemble", "lora", "linear", "ensemble",
                "LoRA-MLE adapters and heads trained from different seeds, probabilities averaged",
                check=_needs_members,
            ),
            Method(
                "laplace", "LoRA-LL-Laplace", "lora", "laplace", "one_pass",
                "LoRA-MLE's features plus last-layer Laplace (evidence prior; at the MAP refit, head.laplace.mean)",
            ),
            Method(
                "blob", "BLoB", "blob", "linear", "blob",
                "Bayesian LoRA (BLoB, Wang et al. 2024): a Gaussian posterior on LoRA's A trained by the ELBO "
                "with KL re-weighting, a trainable linear head; blob.eval_samples sampled passes at test time",
            ),
            Method(
                "polar_blob", "PoLAR-BLoB", "polar_blob", "linear", "blob",
                "PoLAR with BLoB's Gaussian posterior on its core Theta (U, V on the Stiefel manifold), trained by "
                "BLoB's ELBO, a trainable linear head; polar_blob.eval_samples sampled passes at test time",
            ),
            Method(
                "tfb", "TFB", "lora", "linear", "tfb",
                "training-free Bayesianization (TFB, Shi et al. 2025) of LoRA-MLE: a posterior on A whose one "
                "std scale is searched post hoc on the training data; tfb.eval_samples sampled passes",
            ),
            Method(
                "vbll_lora", "LoRA-VBLL", "lora", "vbll", "one_pass",
                "a VBLL head on LoRA adapters (is PoLAR needed?)",
            ),
        )
    }  # fmt: skip
)


def get_method(name: str) -> Method:
    """The method called ``name``; an unknown name is refused with the valid ones."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]
