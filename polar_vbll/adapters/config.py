"""Configuration of the adapter kinds (which layers, which rank, which scale).

:class:`TargetConfig` holds what every low-rank adapter kind shares (the layer selection, the rank, the
scale numerator, input dropout, the init seed); :class:`PolarConfig` (``W0 + (alpha/r) U Theta V^T``) and
:class:`LoraConfig` (``W0 + (alpha/r) B A``, peft) are its two kinds, side by side. Each kind's config is
persisted whole inside every saved adapter, so a saved adapter can always be re-injected into a fresh
backbone with exactly the layers and shapes it was trained with.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from polar_vbll.errors import ConfigError

#: Version of the saved adapter format (``adapter_config.json`` + ``adapter_model.safetensors``).
#: Bump it when the meaning of a saved key or tensor changes; loaders refuse versions they do not know.
#: 2: the config carries ``config_sha256``, a digest of every field a reload uses.
FORMAT_VERSION = 2

#: PoLAR's reference targets (q, k, v, up, down projections of a Llama-style block): what ``auto`` resolves
#: to on a Llama-family model (polar_vbll.architecture.default_target_modules gives every architecture's).
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
#: ``target_modules: auto``: the architecture's own default targets, resolved when the adapter is injected.
AUTO = "auto"


class TargetConfig(BaseModel):
    """Which linear layers get a low-rank adapter, its rank and scale, and how it is initialised.

    ``target_modules`` matches like PEFT's list form: a module is a target when its full name equals an
    entry or ends with ``"." + entry`` (so a plain name such as ``"q_proj"`` matches the last component);
    ``auto`` (the default) is the architecture's own list (:func:`polar_vbll.architecture.default_target_modules`:
    q, k, v, up and down projections of a Llama-family block, ``c_attn, c_fc, mlp.c_proj`` on GPT-2...),
    resolved when the adapter is injected and saved resolved with it.
    ``layers`` selects decoder blocks by index (negative indices count from the end); ``None`` adapts
    every block, and modules outside the numbered blocks (e.g. ``lm_head``) are only adapted when
    ``layers`` is ``None``, as in PEFT's ``layers_to_transform``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(default=8, gt=0, description="Rank of every adapter (columns of U and V).")
    alpha: float = Field(default=32.0, gt=0, description="Scale numerator: update = (alpha / r) x rank-r product.")
    target_modules: list[str] | Literal["auto"] = Field(
        default=AUTO,
        description="Module names (or dotted suffixes) of the linear layers to adapt, or auto: the "
        "architecture's defaults (q, k, v, up, down projections on Llama-family models).",
    )
    layers: list[int] | None = Field(
        default=None, description="Decoder-block indices to adapt (negative = from the end); None = all."
    )
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input only.")
    init_seed: int = Field(default=0, ge=0, description="Seed of the generator drawing the initial U, V.")

    @field_validator("r", "init_seed", mode="before")
    @classmethod
    def _no_bool(cls, v: Any) -> Any:
        # pydantic accepts True as 1 in lax mode; a boolean rank is always a mistake in a YAML file.
        if isinstance(v, bool):
            raise ValueError("must be an integer, not a boolean")
        return v

    @field_validator("alpha")
    @classmethod
    def _finite_alpha(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"must be finite, got {v}")
        return v

    @field_validator("target_modules")
    @classmethod
    def _clean_targets(cls, v: list[str] | str) -> list[str] | str:
        if isinstance(v, str):
            return v
        if not v:
            raise ValueError("an empty list would adapt nothing; use auto for the architecture's defaults")
        bad = [t for t in v if not t or t != t.strip() or t.startswith(".") or t.endswith(".")]
        if bad:
            raise ValueError(f"module names must be non-empty dotted names without spaces, got {bad!r}")
        dupes = sorted({t for t in v if v.count(t) > 1})
        if dupes:
            raise ValueError(f"duplicate entries {dupes!r}")
        return v

    @field_validator("layers")
    @classmethod
    def _clean_layers(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("an empty list would adapt nothing; use null (None) for all blocks")
        dupes = sorted({i for i in v if v.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate block indices {dupes!r}")
        return v

    @property
    def scaling(self) -> float:
        """``s = alpha / r``, the factor in front of the low-rank update."""
        return self.alpha / self.r


class PolarConfig(TargetConfig):
    """A PoLAR adapter ``W0 + (alpha / r) U Theta V^T`` (U, V on the Stiefel manifold; PoLAR's alpha 32)."""


class LoraConfig(TargetConfig):
    """A LoRA adapter ``W0 + (alpha / r) B A`` on peft (A Kaiming-uniform, B = 0), with LoRA's customary
    ``alpha = 2r`` by default; ``init_seed`` seeds A and ``dropout`` is peft's ``lora_dropout``."""

    alpha: float = Field(default=16.0, gt=0, description="Scale numerator: update = (alpha / r) B A.")


class BlobSettings(BaseModel):
    """BLoB's own settings (Wang et al., NeurIPS 2024, "BLoB: Bayesian Low-Rank Adaptation by
    Backpropagation"): the Gaussian posterior's parametrisation, its prior, its second optimizer and its
    test-time samples. Defaults are the reference code's BLoB protocol (Wang-ML-Lab/bayesian-peft,
    ``scripts/blob/blob-llama-all.sh``): ``eps`` 0.05, ``beta`` 0.2, ``kl_lr`` 0.01, ``gamma`` 8, KL
    re-weighting and data-set rescaling on, 10 samples; ``polar_vbll.adapters.blob`` gives the math."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    eps: float = Field(
        default=0.05, description="[choice] the posterior std's parametrisation and init: > 0, sigma = rho^2 with "
        "rho ~ U(eps/sqrt(2), eps); < 0, sigma = softplus(rho) with rho ~ U(eps - 1, eps) (BLoB's bayes_eps)")
    beta: float = Field(default=0.2, gt=0, description="[choice] std of the zero-mean Gaussian prior on the "
                        "Bayesian factor's entries (BLoB's bayes_beta)")
    kl_lr: float = Field(default=0.01, gt=0, description="[choice] learning rate of BLoB's second optimizer: "
                         "plain SGD on the weighted KL (and on sigma's data gradient), under the run's warmup "
                         "and decay (BLoB's bayes_kllr)")
    kl_reweighting: bool = Field(default=True, description="[choice] weight step i's KL by 2^i / (2^(M+1) - 1), "
                                 "i cycling 1..M (Blundell et al. 2015); off: 1/M (BLoB's bayes_klreweighting)")
    dataset_rescaling: bool = Field(default=True, description="[choice] M = int(100 N^(pi/gamma) / batch size) "
                                    "for N training examples; off: the steps of an epoch (BLoB's "
                                    "bayes_datasetrescaling)")
    gamma: float = Field(default=8.0, gt=0, description="[choice] the exponent's divisor in M's rescaling "
                         "(BLoB's bayes_gamma)")
    eval_samples: int = Field(default=10, gt=0, description="test-time backbone passes, each with its own draw "
                              "of the posterior (BLoB's bayes_eval_n_samples_final)")

    @field_validator("eps")
    @classmethod
    def _nonzero_eps(cls, v: float) -> float:
        if v == 0 or not math.isfinite(v):
            raise ValueError(f"must be finite and non-zero (its sign picks sigma's parametrisation), got {v}")
        return v


class BlobConfig(BlobSettings, LoraConfig):
    """BLoB: LoRA whose ``A`` has a diagonal Gaussian posterior ``N(M, sigma^2)`` (``B`` deterministic),
    trained by the ELBO, predicting by ``eval_samples`` backbone passes (:class:`BlobSettings`)."""


class PolarBlobConfig(BlobSettings, PolarConfig):
    """PoLAR-BLoB: PoLAR whose ``r x r`` core ``Theta`` has BLoB's diagonal Gaussian posterior (U, V stay
    points on the Stiefel manifold), trained and predicting as BLoB (:class:`BlobSettings`)."""


def _from_dict(cls: type[TargetConfig], data: Mapping[str, Any] | TargetConfig, what: str, where: str):
    if isinstance(data, cls):
        return data
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        ]
        raise ConfigError(f"invalid {what} config in {where}:\n" + "\n".join(lines)) from None


def polar_config_from_dict(data: Mapping[str, Any] | PolarConfig, where: str) -> PolarConfig:
    """Validate ``data`` as a :class:`PolarConfig`, turning pydantic's error into a :class:`ConfigError`
    that names ``where`` (a file or config section), so the CLI can print it without a traceback."""
    return _from_dict(PolarConfig, data, "PoLAR adapter", where)


def lora_config_from_dict(data: Mapping[str, Any] | LoraConfig, where: str) -> LoraConfig:
    """Validate ``data`` as a :class:`LoraConfig` (errors as :class:`ConfigError` naming ``where``)."""
    return _from_dict(LoraConfig, data, "LoRA adapter", where)


def blob_config_from_dict(data: Mapping[str, Any] | BlobConfig, where: str) -> BlobConfig:
    """Validate ``data`` as a :class:`BlobConfig` (errors as :class:`ConfigError` naming ``where``)."""
    return _from_dict(BlobConfig, data, "BLoB adapter", where)


def polar_blob_config_from_dict(data: Mapping[str, Any] | PolarBlobConfig, where: str) -> PolarBlobConfig:
    """Validate ``data`` as a :class:`PolarBlobConfig` (errors as :class:`ConfigError` naming ``where``)."""
    return _from_dict(PolarBlobConfig, data, "PoLAR-BLoB adapter", where)
