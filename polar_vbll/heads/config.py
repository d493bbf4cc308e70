"""Configuration of the variational Bayesian last layer (``VBLLHead``), see ``docs/method.md`` section 2.

Every field is validated when the config is built: zero, negative or non-finite values are refused with the
field named, so a bad YAML value fails before any tensor is allocated. Building ``VBLLConfig(...)``
directly raises :class:`~polar_vbll.errors.ConfigError`; nested inside a larger pydantic model it raises
pydantic's ``ValidationError`` like every other section (the run-config loader turns that into a
``ConfigError`` naming the full path). ``vbll_config_from_dict`` validates a mapping (e.g. a YAML section).

Conventions (all recorded here because the ``vbll`` package is inconsistent about them):

- ``prior_scale``: the prior is ``p(W) = prod_k N(0, s_p I)`` with ``s_p = prior_scale * 2 / d`` (the
  ``vbll`` package's Kaiming/width scaling; ``d`` = feature dimension).
- ``wishart_scale``, ``dof``: the noise prior is the ``vbll`` package's inverse-Wishart term restricted to
  a diagonal noise covariance ``diag(sigma^2)``:
  ``log p(sigma) = sum_k [ -(dof + K + 1)/2 * log sigma_k^2 - wishart_scale / (2 sigma_k^2) ]``
  (normalising constant dropped; ``K`` counts every class of the head, padding classes included).
- ``init_cov_scale``: the initial covariance is ``init_cov_scale * s_p * I`` (a fraction of the prior
  variance, so the same value means the same thing at every width).
- ``noise_init``: the initial noise standard deviation ``sigma_k`` of every class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from polar_vbll.errors import ConfigError

#: Largest dense covariance (``K * d * d`` parameters) built without ``allow_large_dense=True``: 2**25
#: parameters = 128 MiB in fp32 (about 512 MiB with its gradient and two Adam moments). K=5 at d=2048 fits
#: (21M); K=5 at d=4096 (84M, 336 MB) does not.
DENSE_MAX_PARAMS: int = 2**25


def _format_errors(exc: ValidationError, where: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"  {loc}: {msg} (got {err.get('input')!r})")
    return f"invalid VBLL head config in {where}:\n" + "\n".join(lines)


class VBLLConfig(BaseModel):
    """Settings of the discriminative VBLL head. Options marked [choice] in the method are fields here."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    cov: Literal["diagonal", "lowrank", "dense"] = Field(
        "diagonal",
        description="covariance form of each row's posterior: diag, P P^T + diag (rank cov_rank), or Cholesky",
    )
    cov_rank: int = Field(4, gt=0, description="rank of P_k in the lowrank form (ignored otherwise)")
    prior_scale: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="prior variance s_p = prior_scale * 2 / d"
    )
    prior_mean: Literal["zero", "init"] = Field(
        "zero",
        description="[choice] prior mean of each row: zero (method.md), or the rows the head starts from "
        "(the LM head's answer rows), so the prior pulls toward the zero-shot model rather than toward 0",
    )
    prior_fit: Literal["fixed", "empirical_bayes", "evidence"] = Field(
        "fixed",
        description="[choice] the prior variance s_p: fixed at prior_scale * 2 / D; empirical_bayes: set in "
        "every eta-phase to the ELBO's closed-form optimum given the posterior (prior_scale is then only its "
        "starting value); evidence: set in every eta-phase, before q is fitted, to the variance that "
        "maximises the Laplace evidence of a MAP linear head on the same features (type-II maximum "
        "likelihood, as the probe and last-layer Laplace; needs prior_mean zero)",
    )
    noise_init: float = Field(
        0.1, gt=0, allow_inf_nan=False, description="initial noise standard deviation sigma_k"
    )
    wishart_scale: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="scale of the inverse-Wishart noise prior (vbll's)"
    )
    dof: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="degrees of freedom of the noise prior (vbll's)"
    )
    init_cov_scale: float = Field(
        1.0,
        gt=0,
        allow_inf_nan=False,
        description="initial covariance = init_cov_scale * s_p * I (1: at the prior, as the vbll package; the "
        "eta-phase fits it to convergence from there)",
    )
    predictive: Literal["mc", "probit"] = Field(
        "mc",
        description="[choice] 'mc': softmax averaged over logit samples; 'probit': softmax(mean / "
        "sqrt(1 + pi/8 var))",
    )
    mc_samples: int = Field(1000, gt=0, description="logit samples per example for predictive='mc'")
    mc_seed: int | None = Field(
        0, ge=0, description="seed of the logit samples (None: the global RNG, not reproducible)"
    )
    init_seed: int = Field(0, ge=0, description="seed of the random parts of the initialisation")
    elbo: Literal["jensen", "mc"] = Field(
        "jensen", description="[choice] the ELBO's data term: jensen, the deterministic bound "
        "-(m_y x - logsumexp_k(m_k x + var_k / 2)) (method.md); mc, a Monte Carlo estimate of "
        "-E_q[log softmax(z)_y] with elbo_samples reparameterised draws per example (common random numbers: "
        "the same draws at every call, seeded by mc_seed, so the eta-phase's L-BFGS sees one objective)")
    elbo_samples: int = Field(32, gt=0, description="draws per example of the mc ELBO's data term")
    allow_large_dense: bool = Field(
        False, description=f"build a dense covariance above {DENSE_MAX_PARAMS} parameters"
    )

    @field_validator("cov_rank", "mc_samples", "mc_seed", "init_seed", mode="before")
    @classmethod
    def _no_bool(cls, v: Any) -> Any:
        # pydantic's lax mode reads True as 1; a boolean rank or sample count is always a YAML mistake.
        if isinstance(v, bool):
            raise ValueError("must be an integer, not a boolean")
        return v

    @model_validator(mode="after")
    def _evidence_needs_zero_mean(self) -> VBLLConfig:
        if self.prior_fit == "evidence" and self.prior_mean != "zero":
            raise ValueError("prior_fit evidence chooses the variance of a zero-mean prior; set prior_mean zero")
        return self


def vbll_config_from_dict(
    data: Mapping[str, Any] | VBLLConfig | None, where: str = "head.vbll"
) -> VBLLConfig:
    """Validate ``data`` as a :class:`VBLLConfig` (None: the defaults), raising :class:`ConfigError` that
    names ``where`` and every bad field."""
    if data is None:
        return VBLLConfig()
    if isinstance(data, VBLLConfig):
        return data
    try:
        return VBLLConfig(**dict(data))
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, where)) from None
