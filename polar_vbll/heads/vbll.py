"""The variational Bayesian last layer (VBLL; Harrison, Willes, Snoek, ICLR 2024), discriminative
classification with the deterministic Jensen bound, as written in ``docs/method.md`` section 2.

Model: ``z = W x + eps``, ``eps ~ N(0, diag(sigma^2))``, ``y ~ Categorical(softmax(z))``, on the head's
view of the features ``x = FeatureMap(phi)`` (``polar_vbll.heads.features``: standardised with training
statistics stored in the head, plus a bias column; the identity by default), with a variational posterior
``q(W) = prod_k N(m_k, S_k)`` over the K rows of W (each of length D, the width of x), prior
``p(W) = prod_k N(m0_k, s_p I)`` (``s_p = prior_scale * 2 / D`` at construction, the ``vbll`` package's
convention, or set by empirical Bayes, below) and a learned per-class noise ``sigma_k`` with the ``vbll``
package's inverse-Wishart prior. Training minimises, per example,

    L = -(1/B) sum_b [ m_{y_b}^T x_b - logsumexp_k( m_k^T x_b + 1/2 (x_b^T S_k x_b + sigma_k^2) ) ]
        + (1/N) [ KL(q(W) || p(W)) - log p(sigma) ]
    KL = 1/2 sum_k [ ||m_k - m0_k||^2 / s_p + tr(S_k) / s_p - log|S_k| + D log s_p - D ]
    log p(sigma) = sum_k [ -(dof + K + 1)/2 * log sigma_k^2 - wishart_scale / (2 sigma_k^2) ]   (+ const)

with N the training-set size (``dataset_size``): the KL weight is exactly 1/N, fixed at construction.

Empirical Bayes ([choice] ``prior_fit: empirical_bayes``): the negative ELBO's minimum over ``s_p`` with q
fixed is closed-form, ``dKL/ds_p = 0`` at

    s_p* = sum_k ( ||m_k - m0_k||^2 + tr(S_k) ) / (K D)        (:meth:`VBLLHead.empirical_bayes_prior_var`)

and the eta-phase alternates it with the fit of q (``polar_vbll.heads.fit``). ``s_p`` is the buffer
``vbll_prior_var``, saved with the head.

Parameters (every name starts with ``vbll_`` so optimizers, gathers and checkpoints select the head by
name; none of them may get weight decay, which would fight the prior: use ``parameter_groups()``):

- ``vbll_mean`` (K, d): the posterior means m_k.
- ``vbll_logdiag`` (K, d): ALWAYS a log standard deviation (the log of a Cholesky-factor diagonal):
  ``diagonal``: ``S_k = diag(exp(2 logdiag_k))``;
  ``lowrank``:  ``S_k = P_k P_k^T + diag(exp(2 logdiag_k))``;
  ``dense``:    ``S_k = L_k L_k^T``, ``L_k = tril(offdiag_k, -1) + diag(exp(logdiag_k))``.
  (The ``vbll`` package uses its ``W_logdiag`` as a log-std for diagonal/dense but as a log-VARIANCE for
  lowrank: its lowrank ``W_logdiag`` equals ``2 * vbll_logdiag`` here.)
- ``vbll_lowrank`` (K, d, rank): P_k (lowrank only).
- ``vbll_offdiag`` (K, d, d): the strictly lower triangle of L_k (dense only; the upper triangle and the
  diagonal of this tensor are unused and receive zero gradient).
- ``vbll_noise_logstd`` (K,): ``log sigma_k``.

Buffers: ``vbll_prior_var`` (the prior variance s_p), ``vbll_prior_mean`` (K, D), and the feature map's
``feature_map.shift`` / ``feature_map.scale`` (d,).

Numerics: all head math runs in fp32, or in float64 when phi or the parameters are float64, whatever the
dtype of phi (bf16 features are cast up) and with autocast disabled inside the head. Nothing is clamped:
a covariance that loses positive definiteness shows up as a non-finite loss and in
``check_positive_definite``, which names the class and the step.

Padding classes: ``n_choices`` (B,) masks the classes beyond each question's number of choices exactly
like ``polar_vbll.heads.deterministic.masked_logits``: their logit mean is -inf, their variance 0, they
are left out of the logsumexp and get probability exactly 0. The regulariser still covers all K rows.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from polar_vbll.errors import ConfigError, HeadFitDiverged
from polar_vbll.heads.checks import range_check_due
from polar_vbll.heads.config import DENSE_MAX_PARAMS, VBLLConfig, vbll_config_from_dict
from polar_vbll.heads.features import FeatureMap, FeatureMapConfig
from polar_vbll.heads.predictive import (
    gaussian_mutual_information,
    mc_softmax,
    mean_valid,
    predictive_entropy,
    probit_softmax,
)

#: Initial size of the low-rank factor relative to the diagonal part: P_k must start non-zero (P = 0 is a
#: stationary point of the loss, so it would never move) but small, so the initial S_k is ~ the diagonal.
_LOWRANK_INIT_RATIO = 0.1


def vbll_parameter_count(in_features: int, num_classes: int, config: VBLLConfig) -> int:
    """Number of scalars the head holds (computed before anything is allocated)."""
    k, d = num_classes, in_features
    n = k * d + k  # means, noise
    if config.cov == "diagonal":
        n += k * d
    elif config.cov == "lowrank":
        n += k * d * (config.cov_rank + 1)
    else:
        n += k * d + k * d * d
    return n


def _dense_cost_message(in_features: int, num_classes: int) -> str:
    n = num_classes * in_features * in_features
    return (
        f"a dense VBLL covariance for K={num_classes} classes and d={in_features} features is K*d^2 = "
        f"{n:,} parameters: {n * 4 / 1e6:,.0f} MB in fp32, about {n * 16 / 1e9:,.2f} GB with its gradient "
        f"and two Adam moments, and K*d^2 multiply-adds per example per step"
    )


@contextlib.contextmanager
def _no_autocast(device_type: str) -> Iterator[None]:
    """Disable autocast around head math: under a bf16 autocast region a matmul would silently run in
    bf16, and logit variances of order 1e-3 next to means of order 10 do not survive 8 mantissa bits."""
    try:
        ctx = torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type autocast does not know: there is no autocast to disable
        ctx = contextlib.nullcontext()
    with ctx:
        yield


class VBLLHead(nn.Module):
    """Discriminative VBLL classification head over K classes of d features (see the module docstring).

    Same interface as :class:`~polar_vbll.heads.deterministic.DeterministicHead` (``num_classes``,
    ``loss``, ``predict_proba``), plus ``logit_moments``, ``kl``, ``noise_log_prior``, ``ood_scores`` and
    covariance diagnostics.

    Args:
        in_features: d, the backbone's feature dimension (phi is (B, d)).
        num_classes: K, including padding classes of questions with fewer choices.
        dataset_size: N, the training-set size; the regulariser is weighted by exactly 1/N.
        config: a :class:`VBLLConfig`, a mapping validated as one, or None for the defaults.
        dtype: parameter dtype (fp32 by default; float64 for reference computations).
        features: how the head sees phi (:class:`~polar_vbll.heads.features.FeatureMapConfig`); None: raw
            phi, no bias column (D = d).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        dataset_size: int,
        config: VBLLConfig | Mapping[str, Any] | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        features: FeatureMapConfig | None = None,
    ):
        super().__init__()
        cfg = vbll_config_from_dict(config).model_copy()
        for name, value, low in (("in_features", in_features, 1), ("num_classes", num_classes, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"VBLL head: {name} must be a positive integer, got {value!r}")
        if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size <= 0:
            raise ConfigError(
                f"VBLL head: dataset_size must be a positive integer (N, the training-set size; the KL "
                f"weight is 1/N), got {dataset_size!r}"
            )
        if dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"VBLL head: parameters must be float32 or float64, got {dtype}")
        k, d = num_classes, in_features + int(features is not None and features.bias)  # rows act on x, width D
        # The memory guard runs before any allocation: a refused head must not cost its 336 MB first.
        if cfg.cov == "dense" and k * d * d > DENSE_MAX_PARAMS:
            if not cfg.allow_large_dense:
                raise ConfigError(
                    f"VBLL head: {_dense_cost_message(d, k)}; this is above the limit of "
                    f"{DENSE_MAX_PARAMS:,} parameters. Use cov='lowrank' (K*d*(rank+1) parameters) or set "
                    f"allow_large_dense=True to build it anyway"
                )
            warnings.warn(f"VBLL head: building {_dense_cost_message(d, k)}", stacklevel=2)

        self.feature_map = FeatureMap(in_features, features, dtype=dtype)
        self.config = cfg
        self._in_features = in_features
        self._dim = d
        self._dataset_size = dataset_size
        #: prior variance s_p of every weight (the vbll package's Kaiming/width scaling; empirical Bayes moves it)
        self.register_buffer("vbll_prior_var", torch.tensor(cfg.prior_scale * 2.0 / d, dtype=dtype))
        init_var = cfg.init_cov_scale * self.prior_var

        gen = torch.Generator(device="cpu")
        gen.manual_seed(cfg.init_seed)
        # Kaiming init of the means (as the vbll package) when not started from LM-head rows (from_weight).
        self.vbll_mean = nn.Parameter(torch.randn(k, d, generator=gen, dtype=dtype) * math.sqrt(2.0 / d))
        self.vbll_logdiag = nn.Parameter(torch.full((k, d), 0.5 * math.log(init_var), dtype=dtype))
        if cfg.cov == "lowrank":
            r = cfg.cov_rank
            scale = math.sqrt(init_var / r) * _LOWRANK_INIT_RATIO
            self.vbll_lowrank = nn.Parameter(torch.randn(k, d, r, generator=gen, dtype=dtype) * scale)
        elif cfg.cov == "dense":
            self.vbll_offdiag = nn.Parameter(torch.zeros(k, d, d, dtype=dtype))
        self.vbll_noise_logstd = nn.Parameter(torch.full((k,), math.log(cfg.noise_init), dtype=dtype))
        #: prior mean of the rows: zero (method.md), or the initial rows (``prior_mean: init``, set by from_weight)
        self.register_buffer("vbll_prior_mean", torch.zeros(k, d, dtype=dtype))

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        dataset_size: int,
        config: VBLLConfig | Mapping[str, Any] | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        features: FeatureMapConfig | None = None,
    ) -> VBLLHead:
        """A head whose means are the LM head's answer-token rows ``weight`` (K, d) (in the feature map's
        coordinates, :meth:`~polar_vbll.heads.features.FeatureMap.from_raw`), so its mean logits start at
        the zero-shot model's; the covariance starts at ``init_cov_scale * s_p * I`` and the noise at
        ``noise_init``."""
        if weight.dim() != 2:
            raise ConfigError(
                f"VBLL head: from_weight needs a (K, d) weight, got shape {tuple(weight.shape)}"
            )
        k, d = weight.shape
        head = cls(d, k, dataset_size, config, dtype=dtype, features=features)
        with torch.no_grad():
            rows = head.feature_map.from_raw(weight.detach()).to(dtype)  # [W, 0]: the statistics are not set yet
            head.vbll_mean.copy_(rows)
            if head.config.prior_mean == "init":
                head.vbll_prior_mean.copy_(rows)
        return head

    # ----- basic properties

    @property
    def num_classes(self) -> int:
        return self.vbll_mean.shape[0]

    @property
    def in_features(self) -> int:
        """d, the width of phi."""
        return self._in_features

    @property
    def dim(self) -> int:
        """D, the width of the head's view x of the features (d, plus 1 with the bias column)."""
        return self._dim

    @property
    def prior_var(self) -> float:
        """The prior variance s_p of every weight."""
        return float(self.vbll_prior_var)

    @property
    def dataset_size(self) -> int:
        """N: the regulariser ``KL - log p(sigma)`` is divided by exactly this."""
        return self._dataset_size

    @property
    def cov(self) -> str:
        return self.config.cov

    def extra_repr(self) -> str:
        rank = f", rank={self.config.cov_rank}" if self.cov == "lowrank" else ""
        return (
            f"in_features={self.in_features}, dim={self.dim}, num_classes={self.num_classes}, "
            f"cov={self.cov}{rank}, "
            f"dataset_size={self.dataset_size}, prior_var={self.prior_var:.3g}, "
            f"predictive={self.config.predictive}"
        )

    def parameter_groups(self, lr: float | None = None) -> list[dict[str, Any]]:
        """One optimizer group holding every head parameter with ``weight_decay=0``: decay would pull the
        means and (log-)scales towards 0 on top of the prior, which already regularises them via the KL.
        (Buffers, the prior variance and the feature statistics included, are not optimised.)"""
        group: dict[str, Any] = {"params": list(self.parameters()), "weight_decay": 0.0, "name": "vbll_head"}
        if lr is not None:
            group["lr"] = lr
        return [group]

    # ----- internal helpers

    def _dtype(self, phi: torch.Tensor | None = None) -> torch.dtype:
        """fp32, or float64 when the parameters or phi are float64 (never lower than fp32)."""
        if self.vbll_mean.dtype == torch.float64 or (phi is not None and phi.dtype == torch.float64):
            return torch.float64
        return torch.float32

    def _param(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return getattr(self, name).to(dtype)

    def _check_inputs(
        self, phi: torch.Tensor, n_choices: torch.Tensor | None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Validate shapes and ranges; return ``n_choices`` on phi's device (all K when None). The range check
        costs one host sync per call, worth it: a label beyond its question's choices would otherwise give
        an infinite loss with no hint of which example caused it; the trainer checks its split once and
        skips it in the step (``polar_vbll.heads.checks``)."""
        if phi.dim() != 2 or phi.shape[1] != self.in_features:
            raise ValueError(
                f"VBLL head: phi must have shape (B, {self.in_features}), got {tuple(phi.shape)}"
            )
        b, k = phi.shape[0], self.num_classes
        if n_choices is None:
            n_choices = torch.full((b,), k, dtype=torch.long, device=phi.device)
        if n_choices.shape != (b,):
            raise ValueError(f"VBLL head: n_choices must have shape ({b},), got {tuple(n_choices.shape)}")
        n_choices = n_choices.to(phi.device)
        bad = (n_choices < 1) | (n_choices > k)
        if labels is not None:
            if labels.shape != (b,):
                raise ValueError(f"VBLL head: labels must have shape ({b},), got {tuple(labels.shape)}")
            labels = labels.to(phi.device)
            bad = bad | (labels < 0) | (labels >= n_choices)
        if range_check_due() and bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            lab = f", label {int(labels[i])}" if labels is not None else ""
            raise ValueError(
                f"VBLL head: example {i} of the batch has n_choices {int(n_choices[i])}{lab}; need "
                f"1 <= n_choices <= {k} and 0 <= label < n_choices"
            )
        return n_choices

    def _diag_var(self, dtype: torch.dtype) -> torch.Tensor:
        """(K, d): the diagonal part ``exp(2 logdiag)`` (all of S_k for ``diagonal``)."""
        return torch.exp(2.0 * self._param("vbll_logdiag", dtype))

    def _chol(self, dtype: torch.dtype) -> torch.Tensor:
        """(K, d, d): ``L_k = tril(offdiag_k, -1) + diag(exp(logdiag_k))`` (dense only)."""
        off = torch.tril(self._param("vbll_offdiag", dtype), diagonal=-1)
        return off + torch.diag_embed(torch.exp(self._param("vbll_logdiag", dtype)))

    def covariance(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(K, d, d) dense S_k, for tests and diagnostics at small d only (never used in training)."""
        dtype = dtype or self._dtype()
        if self.cov == "diagonal":
            return torch.diag_embed(self._diag_var(dtype))
        if self.cov == "lowrank":
            p = self._param("vbll_lowrank", dtype)
            return p @ p.transpose(-1, -2) + torch.diag_embed(self._diag_var(dtype))
        chol = self._chol(dtype)
        return chol @ chol.transpose(-1, -2)

    def _quad_form(self, phi: torch.Tensor) -> torch.Tensor:
        """(B, K): ``phi_b^T S_k phi_b`` without forming S_k (phi already in the compute dtype)."""
        dtype = phi.dtype
        if self.cov == "dense":
            lt_phi = torch.einsum("bi,kij->bkj", phi, self._chol(dtype))  # L_k^T phi_b
            return lt_phi.square().sum(-1)
        quad = phi.square() @ self._diag_var(dtype).T
        if self.cov == "lowrank":
            quad = quad + torch.einsum("bd,kdr->bkr", phi, self._param("vbll_lowrank", dtype)).square().sum(
                -1
            )
        return quad

    def _trace_cov(self, dtype: torch.dtype) -> torch.Tensor:
        """(K,): tr(S_k)."""
        tr = self._diag_var(dtype).sum(-1)
        if self.cov == "lowrank":
            tr = tr + self._param("vbll_lowrank", dtype).square().sum((-1, -2))
        elif self.cov == "dense":
            tr = tr + torch.tril(self._param("vbll_offdiag", dtype), diagonal=-1).square().sum((-1, -2))
        return tr

    def _logdet_cov(self, dtype: torch.dtype) -> torch.Tensor:
        """(K,): log|S_k|. Lowrank by the determinant lemma with a Cholesky of the r x r capacitance
        ``I + P^T D^{-1} P`` (>= I, so it factors unless something is non-finite; then the result is NaN)."""
        logdiag = self._param("vbll_logdiag", dtype)
        logdet = 2.0 * logdiag.sum(-1)
        if self.cov == "lowrank":
            m = self._param("vbll_lowrank", dtype) * torch.exp(-logdiag).unsqueeze(-1)  # D^{-1/2} P
            cap = m.transpose(-1, -2) @ m
            cap = cap + torch.eye(cap.shape[-1], dtype=dtype, device=cap.device)
            chol, info = torch.linalg.cholesky_ex(cap)
            cap_logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
            logdet = logdet + torch.where(info == 0, cap_logdet, torch.full_like(cap_logdet, math.nan))
        return logdet

    # ----- the model

    def logit_moments(
        self, phi: torch.Tensor, n_choices: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``m_k^T phi`` and variance ``phi^T S_k phi + sigma_k^2`` of the Gaussian logits, (B, K) each,
        in fp32 (float64 for float64 inputs). Padding classes: mean -inf, variance 0."""
        n_choices = self._check_inputs(phi, n_choices)
        return self._moments(phi, n_choices)

    def _moments(self, phi: torch.Tensor, n_choices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self._dtype(phi)
        with _no_autocast(phi.device.type):
            x = self.feature_map(phi.to(dtype)).to(dtype)
            mean = x @ self._param("vbll_mean", dtype).T
            var = self._quad_form(x) + torch.exp(2.0 * self._param("vbll_noise_logstd", dtype))
            valid = torch.arange(self.num_classes, device=phi.device).unsqueeze(0) < n_choices.unsqueeze(1)
            mean = mean.masked_fill(~valid, float("-inf"))
            var = var.masked_fill(~valid, 0.0)
        return mean, var

    def kl(self) -> torch.Tensor:
        """``KL(q(W) || p(W))`` summed over all K rows, with the ``-d`` constant (the vbll package drops it).
        The prior mean is zero unless ``prior_mean: init`` centred it on the initial (LM-head) rows."""
        dtype = self._dtype()
        with _no_autocast(self.vbll_mean.device.type):
            return self._kl(dtype)

    def _kl(self, dtype: torch.dtype) -> torch.Tensor:
        s_p, d = self.vbll_prior_var.to(dtype), self.dim
        mean_sq = (self._param("vbll_mean", dtype) - self.vbll_prior_mean.to(dtype)).square().sum(-1)
        per_class = (mean_sq + self._trace_cov(dtype)) / s_p - self._logdet_cov(dtype) + d * torch.log(s_p) - d
        return 0.5 * per_class.sum()

    @torch.no_grad()
    def empirical_bayes_prior_var(self) -> float:
        """The prior variance that minimises the negative ELBO with q fixed (only the KL depends on it):
        ``s_p* = sum_k (||m_k - m0_k||^2 + tr S_k) / (K D)`` (module docstring). Does not set it."""
        dtype = torch.float64
        mean_sq = (self._param("vbll_mean", dtype) - self.vbll_prior_mean.to(dtype)).square().sum()
        return float((mean_sq + self._trace_cov(dtype).sum()) / (self.num_classes * self.dim))

    @torch.no_grad()
    def set_prior_var(self, value: float) -> None:
        if not (math.isfinite(value) and value > 0):
            raise HeadFitDiverged(f"VBLL head: the empirical-Bayes prior variance became {value}")
        self.vbll_prior_var.fill_(value)

    @torch.no_grad()
    def fit_features(self, phi: torch.Tensor) -> None:
        """Set the feature map's statistics from training features ``phi`` (N, d) and re-express the means
        and the prior mean in the new coordinates, so the mean logits do not change (the covariance is
        refitted by the eta-phase that follows)."""
        old = self.feature_map.fit(phi)
        self.vbll_mean.copy_(self.feature_map.reexpress(self.vbll_mean, old))
        self.vbll_prior_mean.copy_(self.feature_map.reexpress(self.vbll_prior_mean, old))

    def noise_log_prior(self) -> torch.Tensor:
        """``log p(sigma)``: the vbll package's inverse-Wishart term on ``diag(sigma^2)`` (scale
        ``wishart_scale * I``, ``dof`` degrees of freedom, constant dropped):
        ``sum_k [ -(dof + K + 1)/2 * log sigma_k^2 - wishart_scale / (2 sigma_k^2) ]``."""
        dtype = self._dtype()
        with _no_autocast(self.vbll_mean.device.type):
            return self._noise_log_prior(dtype)

    def _noise_log_prior(self, dtype: torch.dtype) -> torch.Tensor:
        cfg = self.config
        log_var = 2.0 * self._param("vbll_noise_logstd", dtype)
        dof_term = 0.5 * (cfg.dof + self.num_classes + 1.0)
        return (-dof_term * log_var - 0.5 * cfg.wishart_scale * torch.exp(-log_var)).sum()

    def regularizer(self) -> torch.Tensor:
        """``(KL - log p(sigma)) / N``: the per-example share of the ELBO's regulariser."""
        dtype = self._dtype()
        with _no_autocast(self.vbll_mean.device.type):
            return (self._kl(dtype) - self._noise_log_prior(dtype)) / self.dataset_size

    def data_loss(
        self, phi: torch.Tensor, labels: torch.Tensor, n_choices: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Batch mean of the negative Jensen bound on ``E_q[log softmax(z)_y]``:
        ``-(m_y^T phi - logsumexp_k(m_k^T phi + (phi^T S_k phi + sigma_k^2) / 2))``, valid classes only; with
        ``elbo: mc``, a Monte Carlo estimate of ``-E_q[log softmax(z)_y]`` itself (``elbo_samples`` draws of the
        independent Gaussian logits per example, the same draws at every call)."""
        n_choices = self._check_inputs(phi, n_choices, labels)
        mean, var = self._moments(phi, n_choices)
        with _no_autocast(phi.device.type):
            y = labels.to(phi.device).long().unsqueeze(1)
            if self.config.elbo == "mc":  # the exact data term by reparameterised draws (common random numbers)
                s = self.config.elbo_samples
                gen = torch.Generator(device="cpu").manual_seed(self.config.mc_seed or 0)
                eps = torch.randn((s, *mean.shape), generator=gen, dtype=mean.dtype).to(mean.device)
                std = var.clamp_min(torch.finfo(var.dtype).tiny).sqrt()  # padding: var 0, mean -inf, no NaN grad
                z = mean + std * eps
                picked = z.gather(2, y.unsqueeze(0).expand(s, -1, -1)).squeeze(-1)
                return (torch.logsumexp(z, dim=-1) - picked).mean()
            linear = mean.gather(1, y).squeeze(1)
            lse = torch.logsumexp(mean + 0.5 * var, dim=-1)
            return (lse - linear).mean()

    @torch.no_grad()
    def jensen_gap(
        self, phi: torch.Tensor, labels: torch.Tensor, n_choices: torch.Tensor | None = None,
        n_samples: int = 1000, seed: int = 0,
    ) -> dict[str, float]:  # fmt: skip
        """How loose the training bound is on ``phi`` (N, d): ``bound``, the batch mean of :meth:`data_loss`
        (the negative Jensen bound), ``mc``, a Monte Carlo estimate of the exact expected negative
        log-likelihood ``-E_q[log softmax(z)_y]`` with ``z_k ~ N(mean_k, var_k)`` independent (``n_samples``
        draws per example, seeded), and ``gap = bound - mc`` (>= 0 up to Monte Carlo error; nats per
        example), computed in float64. The paper's Table 7 reports this gap."""
        n_choices = self._check_inputs(phi, n_choices, labels)
        mean, var = self._moments(phi.to(torch.float64), n_choices)
        y = labels.to(phi.device).long().unsqueeze(1)
        bound = float((torch.logsumexp(mean + 0.5 * var, -1) - mean.gather(1, y).squeeze(1)).mean())
        gen = torch.Generator(device="cpu").manual_seed(seed)
        total = torch.zeros(mean.shape[0], dtype=torch.float64)
        chunk = 100
        for start in range(0, n_samples, chunk):
            s = min(chunk, n_samples - start)
            eps = torch.randn((s, *mean.shape), generator=gen, dtype=torch.float64).to(mean.device)
            z = mean + var.sqrt() * eps  # padding classes: -inf + 0
            picked = z.gather(2, y.unsqueeze(0).expand(s, -1, -1)).squeeze(-1)  # (s, N): z_y
            total += (torch.logsumexp(z, -1) - picked).sum(0).cpu()
        mc = float(total.mean() / n_samples)
        return {"bound": bound, "mc": mc, "gap": bound - mc, "n_samples": n_samples, "n": int(mean.shape[0])}

    def loss(
        self, phi: torch.Tensor, labels: torch.Tensor, n_choices: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The negative ELBO per example: ``data_loss + (KL - log p(sigma)) / N`` (a scalar)."""
        return self.data_loss(phi, labels, n_choices) + self.regularizer()

    # ----- prediction

    @torch.no_grad()
    def predict_proba(
        self,
        phi: torch.Tensor,
        n_choices: torch.Tensor | None = None,
        method: str | None = None,
        n_samples: int | None = None,
    ) -> torch.Tensor:
        """(B, K) predictive probabilities ``E[softmax(z)]`` (fp32, float64 for float64 inputs) with the
        configured predictive, or ``method`` ('mc' | 'probit') for this call. 'mc' uses ``config.mc_seed``
        and the same draws for every row, so results do not depend on batching."""
        mean, var = self.logit_moments(phi, n_choices)
        return self._predictive(mean, var, method, n_samples)

    def _predictive(
        self, mean: torch.Tensor, var: torch.Tensor, method: str | None, n_samples: int | None
    ) -> torch.Tensor:
        method = method or self.config.predictive
        with _no_autocast(mean.device.type):
            if method == "mc":
                return mc_softmax(mean, var, n_samples or self.config.mc_samples, self.config.mc_seed)
            if method == "probit":
                return probit_softmax(mean, var)
        raise ValueError(f"VBLL head: unknown predictive {method!r} (expected 'mc' or 'probit')")

    @torch.no_grad()
    def ood_scores(self, phi: torch.Tensor, n_choices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-example OOD scores (higher = more likely out of distribution), each (B,), from the configured
        predictive: ``msp``: 1 - max predictive probability; ``entropy``: predictive entropy (nats);
        ``logit_var``: sum over valid classes of the logit variance (noise included)."""
        mean, var = self.logit_moments(phi, n_choices)
        probs = self._predictive(mean, var, None, None)
        return {
            "msp": 1.0 - probs.max(dim=-1).values,
            "entropy": predictive_entropy(probs),
            "logit_var": var.sum(-1),
        }

    @torch.no_grad()
    def uncertainty(self, phi: torch.Tensor, n_choices: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-example (B,) ``logit_var``: the mean over valid classes of the logit variance
        ``x^T S_k x + sigma_k^2``; ``epistemic``: the mutual information (nats) between the label and W
        under q, from ``mc_samples`` seeded draws of the weight part of the logits (the noise sigma is part
        of the likelihood, so it is left out)."""
        n_choices = self._check_inputs(phi, n_choices)
        mean, var = self._moments(phi, n_choices)
        noise = torch.exp(2.0 * self._param("vbll_noise_logstd", var.dtype))
        weight_std = (var - noise).clamp_min(0.0).sqrt()  # padding: var 0 -> 0
        cfg = self.config
        with _no_autocast(mean.device.type):
            return {
                "logit_var": mean_valid(var, n_choices),
                "epistemic": gaussian_mutual_information(mean, weight_std, cfg.mc_samples, cfg.mc_seed),
            }

    # ----- diagnostics

    @torch.no_grad()
    def covariance_diagnostics(self) -> dict[str, torch.Tensor]:
        """Cheap per-class (K,) summaries of S_k for logging: ``min_var`` / ``max_var`` (extremes of the
        diagonal of S_k), ``logdet`` (log|S_k|), ``noise_std`` (sigma_k) and, for diagonal and lowrank,
        ``min_eig_lower_bound`` (the smallest eigenvalue of S_k: exact for diagonal, a lower bound for
        lowrank by Weyl's inequality; no cheap bound exists for dense, which omits it)."""
        dtype = self._dtype()
        diag_part = self._diag_var(dtype)
        if self.cov == "lowrank":
            s_diag = diag_part + self._param("vbll_lowrank", dtype).square().sum(-1)
        elif self.cov == "dense":
            s_diag = self._chol(dtype).square().sum(-1)  # row norms of L_k = diagonal of L_k L_k^T
        else:
            s_diag = diag_part
        out = {
            "min_var": s_diag.min(-1).values,
            "max_var": s_diag.max(-1).values,
            "logdet": self._logdet_cov(dtype),
            "noise_std": torch.exp(self._param("vbll_noise_logstd", dtype)),
        }
        if self.cov != "dense":
            out["min_eig_lower_bound"] = diag_part.min(-1).values
        return out

    @torch.no_grad()
    def check_positive_definite(self, step: int) -> None:
        """Raise :class:`~polar_vbll.errors.HeadFitDiverged` naming the first bad class and ``step`` if any
        class's covariance (or mean or noise) is non-finite, or its covariance is no longer positive
        definite (a variance that underflowed to 0, or a log-determinant that is not finite). Never repairs
        anything: a clamp would hide a diverging run."""
        dtype = self._dtype()
        k = self.num_classes
        checks: list[tuple[str, torch.Tensor]] = [
            ("non-finite posterior mean (vbll_mean)", ~torch.isfinite(self.vbll_mean).all(-1)),
            ("non-finite scale (vbll_logdiag)", ~torch.isfinite(self.vbll_logdiag).all(-1)),
        ]
        if self.cov == "lowrank":
            checks.append(
                (
                    "non-finite low-rank factor (vbll_lowrank)",
                    ~torch.isfinite(self.vbll_lowrank).all((-1, -2)),
                )
            )
        elif self.cov == "dense":
            lower = torch.tril(torch.ones(self.dim, self.dim, dtype=torch.bool), diagonal=-1)
            finite = torch.isfinite(self.vbll_offdiag) | ~lower.to(self.vbll_offdiag.device)
            checks.append(("non-finite Cholesky factor (vbll_offdiag)", ~finite.all((-1, -2))))
        checks += [
            ("a variance underflowed to 0 (vbll_logdiag too negative)", ~(self._diag_var(dtype) > 0).all(-1)),
            ("non-finite log-determinant", ~torch.isfinite(self._logdet_cov(dtype))),
            (
                "noise variance non-finite or 0 (vbll_noise_logstd)",
                ~(
                    torch.isfinite(self.vbll_noise_logstd)
                    & (torch.exp(2.0 * self._param("vbll_noise_logstd", dtype)) > 0)
                ),
            ),
        ]
        bad = torch.stack([c for _, c in checks])  # (n_checks, K)
        if not bool(bad.any()):
            return
        for cls_idx in range(k):
            reasons = [name for name, c in checks if bool(c[cls_idx])]
            if reasons:
                raise HeadFitDiverged(
                    f"VBLL head ({self.cov} covariance): class {cls_idx} is no longer a valid Gaussian at step "
                    f"{step} of the eta-phase (refit count): {'; '.join(reasons)}. Lower head.fit.lr or check "
                    "the features for non-finite values"
                )
