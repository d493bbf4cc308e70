"""Post-hoc last-layer Laplace (Daxberger et al. 2021, "Laplace Redux") on a linear softmax head.

The head is ``z = W phi + b`` with ``W`` (K, d) fixed at a trained value ``W*`` (the answer-token rows of
the LM head, or a trained head) and the bias ``b`` kept fixed (not part of the posterior). The adapters and
the backbone are not touched: the posterior is over ``vec(W)`` only (row-major, ``P = K d`` entries, entry
``k d + j`` is ``W[k, j]``), fitted once on the training features. Built from a head with a feature map
(``polar_vbll.heads.features``: standardised features plus a bias column, the ``linear`` head), ``phi``
below is that map's output ``x``: the posterior then covers the bias column too, and its isotropic prior
acts on standardised features (the same scale-aware care as the VBLL head).

Curvature. For a linear softmax layer the generalized Gauss-Newton equals the Hessian of the summed NLL:

    H = sum_b (diag(p_b) - p_b p_b^T) kron (phi_b phi_b^T),   p_b = softmax(masked z_b)

Padded classes (beyond a question's number of choices) have ``p = 0``, so their rows and columns of the
``K x K`` factor vanish and such a question says nothing about the weights of letters it does not have.

Structures:

- ``full``: ``H`` itself (``P x P``; 2880^2 at K = 5, d = 576, fine; refused above ``max_full_params``).
- ``kron`` (KFAC, for wide heads): ``A = sum_b phi_b phi_b^T`` (d x d), ``G = sum_b (diag p_b - p_b p_b^T)``
  (K x K), ``H ~= G kron A / N``. The ``1/N`` makes the approximation exact when every ``G_b`` is the same
  (and is the usual KFAC expectation form ``N E[G] kron E[A]``). With ``G = Q_G diag(g) Q_G^T`` and
  ``A = Q_A diag(a) Q_A^T``, ``H + lam I = (Q_G kron Q_A) diag(g_i a_j / N + lam) (Q_G kron Q_A)^T``, which
  gives the inverse and the log determinant from two small eigendecompositions.

Prior and its precision. ``p(W) = N(0, lam^{-1} I)``. ``lam`` (``prior_precision``) is chosen by maximising
the Laplace log marginal likelihood (with the ``2 pi`` terms cancelled):

    log Z(lam) = log p(D | W*) - lam/2 ||W*||^2 + P/2 log lam - 1/2 log det(H + lam I)

With the eigenvalues ``e_i`` of ``H`` (or ``g_i a_j / N``) this is cheap for any ``lam``, and it is strictly
concave in ``t = log lam`` (``d2/dt2 = -1/2 (lam ||W*||^2 + sum_i lam e_i / (e_i + lam)^2) < 0``). So the
maximiser is the unique root of ``d/dt = 1/2 (sum_i e_i / (e_i + lam) - lam ||W*||^2)`` (MacKay's fixed point
``lam = gamma / ||W*||^2``, ``gamma`` the effective number of parameters), found by bisection on ``log lam``
to machine precision within ``prior_precision_bounds`` (clamped to a bound when the root lies outside).
``W*`` is held fixed while ``lam`` varies, as in every post-hoc Laplace; when ``W*`` was not trained as a
MAP under this prior (e.g. LM-head rows), the evidence is still the standard, usable selection criterion.

Predictive. The logits are Gaussian: mean ``W* phi + b``, covariance ``J Sigma J^T`` (K x K) with
``J = I_K kron phi^T`` and ``Sigma = (H + lam I)^{-1}``. Two ways to integrate the softmax:
``"probit"`` (the generalized probit / "mean-field" approximation, Lu et al. 2020, as in laplace-torch:
``softmax(mu_k / sqrt(1 + pi/8 Sigma_kk))``, deterministic, one pass) and ``"mc"`` (``n_samples`` draws of
the K logits from the full K x K Gaussian, averaged softmax; seeded, so a given input always gets the same
answer). Either way it is one backbone pass per example plus K x K algebra per example.

Precision: all curvature and predictive math is float64. It is cheap here (a ``P x P`` eigendecomposition
once, ``K x K`` per example) and the log determinant and the ``lam -> infinity`` limit are exactly where
float32 loses digits. Probabilities are returned as float32 like every head.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from polar_vbll.errors import ConfigError
from polar_vbll.heads.deterministic import masked_logits
from polar_vbll.heads.predictive import mean_valid, mutual_information

Structure = Literal["full", "kron"]
Predictive = Literal["probit", "mc"]
STRUCTURES: tuple[str, ...] = get_args(Structure)
PREDICTIVES: tuple[str, ...] = get_args(Predictive)

_F64 = torch.float64


def _softmax_probs(
    phi: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n_choices: torch.Tensor
):
    """``(masked logits, probabilities)`` in float64; padded classes get logit -inf and probability 0."""
    z = phi @ weight.T
    if bias is not None:
        z = z + bias
    z = masked_logits(z, n_choices)
    return z, torch.softmax(z, dim=-1)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _softmax_hessian_factors(p: torch.Tensor) -> torch.Tensor:
    """``diag(p_b) - p_b p_b^T`` for every row, ``(B, K, K)``."""
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


def full_ggn(
    phi: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    n_choices: torch.Tensor,
    chunk: int = 512,
) -> torch.Tensor:
    """The exact Hessian (= GGN) of the summed NLL w.r.t. row-major ``vec(W)``, ``(K d, K d)`` float64:
    ``sum_b (diag p_b - p_b p_b^T) kron phi_b phi_b^T``. Accumulated in chunks of rows, so memory stays at
    the size of ``H`` plus ``chunk * K^2 * d``."""
    k, d = weight.shape
    w = weight.to(_F64)
    b = None if bias is None else bias.to(device=w.device, dtype=_F64)
    h = torch.zeros((k, d, k, d), dtype=_F64, device=w.device)
    for s in _chunks(phi.shape[0], chunk):
        x = phi[s].to(device=w.device, dtype=_F64)
        _, p = _softmax_probs(x, w, b, n_choices[s].to(w.device))
        h += torch.einsum("bkl,bi,bj->kilj", _softmax_hessian_factors(p), x, x)
    return h.reshape(k * d, k * d)


def kron_factors(
    phi: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    n_choices: torch.Tensor,
    chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The KFAC factors ``(A, G)`` in float64: ``A = sum_b phi_b phi_b^T`` (d x d) and
    ``G = sum_b (diag p_b - p_b p_b^T)`` (K x K); the curvature is ``G kron A / N``."""
    k, d = weight.shape
    w = weight.to(_F64)
    b = None if bias is None else bias.to(device=w.device, dtype=_F64)
    a = torch.zeros((d, d), dtype=_F64, device=w.device)
    g = torch.zeros((k, k), dtype=_F64, device=w.device)
    for s in _chunks(phi.shape[0], chunk):
        x = phi[s].to(device=w.device, dtype=_F64)
        _, p = _softmax_probs(x, w, b, n_choices[s].to(w.device))
        a += x.T @ x
        g += _softmax_hessian_factors(p).sum(dim=0)
    return a, g


def _check_inputs(
    phi: torch.Tensor, n_choices: torch.Tensor, k: int, d: int, labels: torch.Tensor | None
) -> None:
    if phi.ndim != 2 or phi.shape[1] != d:
        raise ValueError(f"phi must have shape (N, {d}), got {tuple(phi.shape)}")
    if n_choices.shape != (phi.shape[0],):
        raise ValueError(f"n_choices must have shape ({phi.shape[0]},), got {tuple(n_choices.shape)}")
    if phi.shape[0] and (int(n_choices.min()) < 1 or int(n_choices.max()) > k):
        raise ValueError(f"n_choices must lie in 1..{k}")
    if not torch.isfinite(phi).all():
        raise ValueError("phi contains NaN or inf")
    if labels is not None:
        if labels.shape != (phi.shape[0],):
            raise ValueError(f"labels must have shape ({phi.shape[0]},), got {tuple(labels.shape)}")
        if phi.shape[0] and (bool((labels < 0).any()) or bool((labels.cpu() >= n_choices.cpu()).any())):
            raise ValueError("every label must lie in 0..n_choices-1 of its question")


class LastLayerLaplace(nn.Module):
    """Post-hoc Laplace approximation over the weight of a linear softmax head (see the module docstring).

    ``LastLayerLaplace(W, b, structure="full"|"kron", predictive="probit"|"mc")`` then
    :meth:`fit` ``(phi_train, labels, n_choices)``; after that it is used like a head
    (:attr:`num_classes`, :meth:`predict_proba`, :meth:`logits`), e.g. by ``polar_vbll.predictives.predict``.
    ``prior_precision=None`` (the default) selects the prior precision by maximising the log marginal
    likelihood during :meth:`fit`; a number fixes it. The fitted state lives in float64 buffers, so
    ``.to(device)`` moves it; it is not meant to be checkpointed (refitting on the cached training features
    takes seconds).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        structure: Structure = "full",
        predictive: Predictive = "probit",
        prior_precision: float | None = None,
        n_samples: int = 1000,
        seed: int = 0,
        prior_precision_bounds: tuple[float, float] = (1e-10, 1e10),
        max_full_params: int = 16384,
        feature_map: nn.Module | None = None,
    ) -> None:
        super().__init__()
        #: maps phi (B, d) to the head's features x (B, D) before anything else (None: x = phi)
        self.feature_map = feature_map
        if structure not in STRUCTURES:
            raise ConfigError(f"Laplace structure must be one of {STRUCTURES}, got {structure!r}")
        if predictive not in PREDICTIVES:
            raise ConfigError(f"Laplace predictive must be one of {PREDICTIVES}, got {predictive!r}")
        if weight.ndim != 2:
            raise ValueError(f"weight must be (K, d), got shape {tuple(weight.shape)}")
        k, d = weight.shape
        if structure == "full" and k * d > max_full_params:
            raise ConfigError(
                f"Laplace structure 'full' on a {k} x {d} head needs a {k * d} x {k * d} matrix; use "
                f"structure 'kron' (or raise max_full_params={max_full_params} if the memory is there)"
            )
        if prior_precision is not None and not (math.isfinite(prior_precision) and prior_precision > 0):
            raise ConfigError(f"prior_precision must be a positive number or None, got {prior_precision}")
        lo, hi = prior_precision_bounds
        if not 0 < lo < hi < math.inf:
            raise ConfigError(f"prior_precision_bounds must satisfy 0 < lo < hi < inf, got {(lo, hi)}")
        if n_samples < 1:
            raise ConfigError(f"n_samples must be >= 1, got {n_samples}")
        self.structure: Structure = structure
        self.predictive: Predictive = predictive
        self.n_samples = int(n_samples)
        self.seed = int(seed)
        self.prior_precision_bounds = (float(lo), float(hi))
        self.optimize_prior = prior_precision is None
        self.prior_precision = 1.0 if prior_precision is None else float(prior_precision)
        self.register_buffer("weight", weight.detach().to(_F64).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().to(_F64).clone())
        # Filled by fit(). full: eigvecs (P, P), eigvals (P,). kron: qa, a, qg, g; eigvals (K, d).
        for name in ("eigvals", "eigvecs", "qa", "a", "qg", "g"):
            self.register_buffer(name, None)
        self.n_data = 0
        self.log_likelihood = math.nan

    @classmethod
    def from_head(cls, head: nn.Module, **kwargs) -> LastLayerLaplace:
        """Build from any head with a ``(K, D)`` ``weight``, an optional ``bias`` and an optional
        ``feature_map`` (``DeterministicHead``, ``LinearHead``; for a VBLL head pass its mean ``m``
        explicitly)."""
        fmap = getattr(head, "feature_map", None)
        return cls(head.weight, getattr(head, "bias", None), feature_map=fmap, **kwargs)

    def _x(self, phi: torch.Tensor) -> torch.Tensor:
        """The head's features of ``phi`` in float64 on the buffers' device."""
        x = phi.detach().to(device=self.weight.device, dtype=_F64)
        if self.feature_map is not None:
            x = self.feature_map.to(self.weight.device)(x)
        return x

    # ------------------------------------------------------------------------------------------ basics
    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def _in_features(self) -> int:
        """The width of phi (the feature map's input, else the weight's)."""
        return self.feature_map.in_features if self.feature_map is not None else self.weight.shape[1]

    @property
    def num_params(self) -> int:
        """``P = K d``, the dimension of the posterior."""
        return self.weight.numel()

    @property
    def fitted(self) -> bool:
        return self.eigvals is not None

    def _require_fit(self) -> None:
        if not self.fitted:
            raise RuntimeError("LastLayerLaplace: call fit(phi_train, labels, n_choices) first")

    def logits(self, phi: torch.Tensor, n_choices: torch.Tensor) -> torch.Tensor:
        """The MAP logits ``W* phi + b`` (masked), float32: what the deterministic head would give."""
        z, _ = _softmax_probs(self._x(phi), self.weight, self.bias, n_choices.to(self.weight.device))
        return z.to(device=phi.device, dtype=torch.float32)

    # --------------------------------------------------------------------------------------------- fit
    @torch.no_grad()
    def fit(self, phi: torch.Tensor, labels: torch.Tensor, n_choices: torch.Tensor) -> LastLayerLaplace:
        """Accumulate the curvature of the summed NLL at ``W*`` on the training features, eigendecompose it,
        and (unless a prior precision was fixed) choose the prior precision by the marginal likelihood."""
        k, d = self.weight.shape
        _check_inputs(phi, n_choices, k, self._in_features, labels)
        if phi.shape[0] == 0:
            raise ValueError("LastLayerLaplace.fit: no training examples")
        dev = self.weight.device
        phi64 = self._x(phi)
        n_choices = n_choices.to(dev)
        z, _ = _softmax_probs(phi64, self.weight, self.bias, n_choices)
        self.log_likelihood = float(-F.cross_entropy(z, labels.to(dev), reduction="sum"))
        self.n_data = int(phi.shape[0])
        if self.structure == "full":
            e, q = torch.linalg.eigh(full_ggn(phi64, self.weight, self.bias, n_choices))
            self.eigvals, self.eigvecs = e.clamp_min(0.0), q
            self.qa = self.a = self.qg = self.g = None
        else:
            a_mat, g_mat = kron_factors(phi64, self.weight, self.bias, n_choices)
            a, qa = torch.linalg.eigh(a_mat)
            g, qg = torch.linalg.eigh(g_mat)
            self.a, self.qa, self.g, self.qg = a.clamp_min(0.0), qa, g.clamp_min(0.0), qg
            self.eigvals = torch.outer(self.g, self.a) / self.n_data
            self.eigvecs = None
        if self.optimize_prior:
            self.optimize_prior_precision()
        return self

    def hessian(self) -> torch.Tensor:
        """The curvature used, as a dense ``(P, P)`` float64 matrix (``H`` for full, ``G kron A / N`` for
        kron), rebuilt from the eigendecomposition (negative round-off eigenvalues clamped to 0)."""
        self._require_fit()
        if self.structure == "full":
            return (self.eigvecs * self.eigvals) @ self.eigvecs.T
        g_mat = (self.qg * self.g) @ self.qg.T
        a_mat = (self.qa * self.a) @ self.qa.T
        return torch.kron(g_mat, a_mat) / self.n_data

    # ------------------------------------------------------------------------------- marginal likelihood
    def log_marginal_likelihood(self, lam: float | None = None) -> float:
        """Laplace log evidence at prior precision ``lam`` (default: the current one), float64:
        ``log p(D|W*) - lam/2 ||W*||^2 + P/2 log lam - 1/2 log det(H + lam I)``."""
        self._require_fit()
        lam = self.prior_precision if lam is None else float(lam)
        if not lam > 0:
            raise ValueError(f"prior precision must be positive, got {lam}")
        sq = float(self.weight.square().sum())
        logdet = float(torch.log(self.eigvals + lam).sum())
        return self.log_likelihood - 0.5 * lam * sq + 0.5 * self.num_params * math.log(lam) - 0.5 * logdet

    def _dlogz_dloglam(self, lam: float) -> float:
        sq = float(self.weight.square().sum())
        gamma = float((self.eigvals / (self.eigvals + lam)).sum())  # effective number of parameters
        return 0.5 * (gamma - lam * sq)

    def optimize_prior_precision(self) -> float:
        """Set ``prior_precision`` to the maximiser of :meth:`log_marginal_likelihood` and return it.

        The evidence is strictly concave in ``log lam``, so its derivative is decreasing and bisection on
        ``log lam`` finds the unique maximiser (to ~1e-12 relative) within ``prior_precision_bounds``; if the
        derivative has one sign over the whole range, the corresponding bound is returned.
        """
        self._require_fit()
        lo, hi = (math.log(b) for b in self.prior_precision_bounds)
        if self._dlogz_dloglam(math.exp(lo)) <= 0:
            best = lo
        elif self._dlogz_dloglam(math.exp(hi)) >= 0:
            best = hi
        else:
            for _ in range(200):
                mid = 0.5 * (lo + hi)
                if self._dlogz_dloglam(math.exp(mid)) > 0:
                    lo = mid
                else:
                    hi = mid
                if hi - lo < 1e-13:
                    break
            best = 0.5 * (lo + hi)
        self.prior_precision = math.exp(best)
        return self.prior_precision

    # ------------------------------------------------------------------------------------- predictive
    @torch.no_grad()
    def logit_mean_and_covariance(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The Gaussian over the (unmasked) logits: mean ``W* phi + b`` ``(B, K)`` and covariance
        ``J (H + lam I)^{-1} J^T`` ``(B, K, K)``, float64, on the buffers' device."""
        self._require_fit()
        k, d = self.weight.shape
        if phi.ndim != 2 or phi.shape[1] != self._in_features:
            raise ValueError(f"phi must have shape (B, {self._in_features}), got {tuple(phi.shape)}")
        x = self._x(phi)
        mu = x @ self.weight.T
        if self.bias is not None:
            mu = mu + self.bias
        lam = self.prior_precision
        if self.structure == "full":
            # J Q: row k of J picks block k of vec(W), so (J Q)[b, k, m] = sum_j phi_bj Q[k d + j, m].
            jq = torch.einsum("bj,kjm->bkm", x, self.eigvecs.reshape(k, d, -1))
            cov = torch.einsum("bkm,m,blm->bkl", jq, 1.0 / (self.eigvals + lam), jq)
        else:
            # J (Q_G kron Q_A) = Q_G kron (phi^T Q_A): cov = Q_G diag(c) Q_G^T, c_i = sum_j psi_j^2 / D_ij.
            psi = x @ self.qa
            c = psi.square() @ (1.0 / (self.eigvals + lam)).T
            cov = torch.einsum("ki,bi,li->bkl", self.qg, c, self.qg)
        return mu, cov

    @torch.no_grad()
    def predict_proba(self, phi: torch.Tensor, n_choices: torch.Tensor) -> torch.Tensor:
        """Predictive class probabilities ``(B, K)`` float32 (padded classes exactly 0), by the generalized
        probit or by Monte Carlo over the K logits (``predictive``)."""
        mu, cov = self.logit_mean_and_covariance(phi)
        n_choices = n_choices.to(mu.device)
        if self.predictive == "probit":
            var = cov.diagonal(dim1=-2, dim2=-1).clamp_min(0.0)
            probs = torch.softmax(
                masked_logits(mu / torch.sqrt(1.0 + math.pi / 8.0 * var), n_choices), dim=-1
            )
        else:
            probs = self._mc_probs(mu, cov, n_choices)
        return probs.to(device=phi.device, dtype=torch.float32)

    def _mc_samples(self, mu: torch.Tensor, cov: torch.Tensor, n_choices: torch.Tensor) -> torch.Tensor:
        """(S, B, K) softmax of seeded draws of the K logits from ``N(mu, cov)`` (padded classes 0)."""
        # A symmetric square root (eigh) rather than Cholesky: cov is PSD but may be singular in directions
        # of padded classes or at huge prior precision, where Cholesky would fail.
        e, q = torch.linalg.eigh(cov)
        root = q * e.clamp_min(0.0).sqrt().unsqueeze(-2)
        gen = torch.Generator().manual_seed(self.seed)
        eps = torch.randn((self.n_samples, *mu.shape), generator=gen, dtype=_F64).to(mu.device)
        z = mu.unsqueeze(0) + torch.einsum("bkl,sbl->sbk", root, eps)
        valid = torch.arange(mu.shape[-1], device=mu.device) < n_choices.unsqueeze(1)
        z = z.masked_fill(~valid.unsqueeze(0), float("-inf"))
        return torch.softmax(z, dim=-1)

    def _mc_probs(self, mu: torch.Tensor, cov: torch.Tensor, n_choices: torch.Tensor) -> torch.Tensor:
        return self._mc_samples(mu, cov, n_choices).mean(dim=0)

    @torch.no_grad()
    def uncertainty(self, phi: torch.Tensor, n_choices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-example (B,) ``logit_var``: the mean over valid classes of the logit variances (the diagonal
        of ``J Sigma J^T``); ``epistemic``: the mutual information (nats) between the label and W, from
        ``n_samples`` seeded draws of the K logits (float32, on phi's device)."""
        mu, cov = self.logit_mean_and_covariance(phi)
        n_choices = n_choices.to(mu.device)
        var = cov.diagonal(dim1=-2, dim2=-1).clamp_min(0.0)
        out = {
            "logit_var": mean_valid(var, n_choices),
            "epistemic": mutual_information(self._mc_samples(mu, cov, n_choices)),
        }
        return {k: v.to(device=phi.device, dtype=torch.float32) for k, v in out.items()}


def fit_laplace(
    head: nn.Module,
    phi_train: torch.Tensor,
    labels: torch.Tensor,
    n_choices: torch.Tensor,
    **kwargs,
) -> LastLayerLaplace:
    """``LastLayerLaplace.from_head(head, **kwargs).fit(phi_train, labels, n_choices)``."""
    return LastLayerLaplace.from_head(head, **kwargs).fit(phi_train, labels, n_choices)
