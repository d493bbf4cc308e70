"""Tests of the VBLL head (``polar_vbll.heads.vbll``) against method.md section 2.

Three independent checks of the math: a float64 re-derivation written here with loops and dense S_k
(``reference``), ``torch.distributions`` for the Gaussian KL, and the ``vbll`` package (dev-only oracle,
imported here and never from ``polar_vbll``) on identical parameters.

Convention differences between method.md (which the head follows) and ``vbll==0.4.9``, as asserted below:

1. KL constant: vbll's ``gaussian_kl`` drops the ``-d`` per class ("currently exclude constant"), so its
   training loss is ours + K*d / (2N). Same gradients.
2. ``W_logdiag``: vbll reads it as a log-std for diagonal/dense but as a log-VARIANCE for lowrank. Ours
   (``vbll_logdiag``) is a log-std in every form, so vbll's lowrank ``W_logdiag = 2 * vbll_logdiag`` and
   its gradient is half ours.
3. KL weight: vbll takes ``regularization_weight`` from the caller (it has changed convention between
   releases); ours is fixed to exactly 1/N. We pass ``regularization_weight=1/N`` to the oracle.
4. vbll clips logit variances at 1e-12 (``sqrt(clip(var, 1e-12))``); we never clamp. Irrelevant at the
   variances used here.
5. vbll's predictive is a 20-sample MC average from the global RNG, clipped to [0, 1]; ours is
   configurable (``mc`` with a fixed seed and S samples shared by the batch rows, or ``probit``). We compare
   predictive distributions (logit means/variances) exactly and probabilities with many samples.
6. vbll has no class masking (padding classes); ours masks them out of the bound and the predictive.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

import polar_vbll.heads.vbll as vbll_mod
from polar_vbll.errors import ConfigError
from polar_vbll.heads.config import VBLLConfig, vbll_config_from_dict
from polar_vbll.heads.deterministic import DeterministicHead
from polar_vbll.heads.predictive import mc_softmax, probit_softmax
from polar_vbll.heads.vbll import VBLLHead, vbll_parameter_count

COVS = ["diagonal", "lowrank", "dense"]
K, D, B, N = 4, 6, 7, 37
CFG = dict(cov_rank=2, prior_scale=0.7, wishart_scale=1.3, dof=2.0)


def make_head(cov: str, k: int = K, d: int = D, n: int = N, seed: int = 0, **extra) -> VBLLHead:
    """A float64 head whose parameters are all moved away from the initialisation (so off-diagonal,
    low-rank and noise terms all matter), with S_k well conditioned (diagonal std ~ e^-1 next to
    off-diagonal entries ~ 0.3) so float64 reference log-determinants are accurate to ~1e-14."""
    head = VBLLHead(d, k, n, {**CFG, "cov": cov, **extra}, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name == "vbll_logdiag":
                p.fill_(-1.0)
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return head


def batch(k: int = K, d: int = D, b: int = B, seed: int = 1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    phi = torch.randn(b, d, generator=gen, dtype=dtype)
    n_choices = torch.randint(2, k + 1, (b,), generator=gen)
    labels = torch.stack([torch.randint(0, int(c), (1,), generator=gen)[0] for c in n_choices])
    return phi, labels, n_choices


def dense_covariances(head: VBLLHead) -> list[torch.Tensor]:
    """S_k built entry by entry from the raw parameters, with the documented convention."""
    k, d = head.num_classes, head.in_features
    logdiag = head.vbll_logdiag.detach().double()
    out = []
    for c in range(k):
        if head.cov == "diagonal":
            s = torch.diag(torch.exp(2 * logdiag[c]))
        elif head.cov == "lowrank":
            p = head.vbll_lowrank.detach().double()[c]
            s = p @ p.T + torch.diag(torch.exp(2 * logdiag[c]))
        else:
            chol = torch.zeros(d, d, dtype=torch.float64)
            for i in range(d):
                chol[i, i] = math.exp(float(logdiag[c, i]))
                for j in range(i):
                    chol[i, j] = float(head.vbll_offdiag.detach()[c, i, j])
            s = chol @ chol.T
        out.append(s)
    return out


def reference(head: VBLLHead, phi, labels, n_choices, prior_scale, wishart_scale, dof):
    """Independent float64 re-derivation of method.md's formulas (loops over k and b, dense S_k)."""
    k, d, n = head.num_classes, head.in_features, head.dataset_size
    s = dense_covariances(head)
    m = head.vbll_mean.detach().double()
    sig2 = torch.exp(2 * head.vbll_noise_logstd.detach().double())
    phi = phi.double()
    bsz = phi.shape[0]
    mean = torch.full((bsz, k), float("-inf"), dtype=torch.float64)
    var = torch.zeros(bsz, k, dtype=torch.float64)
    data = 0.0
    for b in range(bsz):
        terms = []
        for c in range(int(n_choices[b])):
            mean[b, c] = m[c] @ phi[b]
            var[b, c] = phi[b] @ s[c] @ phi[b] + sig2[c]
            terms.append(mean[b, c] + 0.5 * var[b, c])
        data = data - (mean[b, int(labels[b])] - torch.logsumexp(torch.stack(terms), 0))
    data = data / bsz
    s_p = prior_scale * 2.0 / d
    kl = 0.0
    for c in range(k):
        kl = kl + 0.5 * (
            m[c] @ m[c] / s_p + torch.trace(s[c]) / s_p - torch.logdet(s[c]) + d * math.log(s_p) - d
        )
    log_p_sigma = sum(
        -(dof + k + 1) / 2 * torch.log(sig2[c]) - wishart_scale / (2 * sig2[c]) for c in range(k)
    )
    return {
        "mean": mean,
        "var": var,
        "data": data,
        "kl": kl,
        "log_p_sigma": log_p_sigma,
        "loss": data + (kl - log_p_sigma) / n,
    }


# ----- the math


@pytest.mark.parametrize("cov", COVS)
def test_matches_float64_reference(cov):
    head = make_head(cov)
    phi, labels, n_choices = batch()
    ref = reference(
        head, phi, labels, n_choices, **{k: CFG[k] for k in ("prior_scale", "wishart_scale", "dof")}
    )
    mean, var = head.logit_moments(phi, n_choices)
    assert torch.equal(torch.isinf(mean), torch.isinf(ref["mean"]))
    valid = torch.isfinite(ref["mean"])
    torch.testing.assert_close(mean[valid], ref["mean"][valid], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, ref["var"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head.kl(), ref["kl"], rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(head.noise_log_prior(), ref["log_p_sigma"], rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(head.data_loss(phi, labels, n_choices), ref["data"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head.loss(phi, labels, n_choices), ref["loss"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cov", COVS)
def test_kl_matches_torch_distributions(cov):
    """The KL formula, ``-d`` constant included, equals the exact Gaussian KL."""
    head = make_head(cov)
    s_p = head.prior_var
    assert s_p == pytest.approx(CFG["prior_scale"] * 2 / D)
    prior = torch.distributions.MultivariateNormal(
        torch.zeros(D, dtype=torch.float64), s_p * torch.eye(D, dtype=torch.float64)
    )
    exact = sum(
        torch.distributions.kl_divergence(
            torch.distributions.MultivariateNormal(head.vbll_mean.detach()[c], covariance_matrix=s), prior
        )
        for c, s in enumerate(dense_covariances(head))
    )
    torch.testing.assert_close(head.kl(), exact, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        head.covariance(), torch.stack(dense_covariances(head)), rtol=1e-12, atol=1e-14
    )


def _oracle(head: VBLLHead):
    """A ``vbll.DiscClassification`` holding exactly our parameters (conventions mapped, see docstring)."""
    vbll = pytest.importorskip("vbll")
    cfg = head.config
    oracle = vbll.DiscClassification(
        in_features=head.in_features,
        out_features=head.num_classes,
        regularization_weight=1.0 / head.dataset_size,
        parameterization=cfg.cov,
        prior_scale=cfg.prior_scale,
        wishart_scale=cfg.wishart_scale,
        dof=cfg.dof,
        cov_rank=cfg.cov_rank,
    ).double()
    with torch.no_grad():
        oracle.W_mean.copy_(head.vbll_mean)
        oracle.noise_logdiag.copy_(head.vbll_noise_logstd)  # both log-std
        if cfg.cov == "lowrank":
            oracle.W_logdiag.copy_(2 * head.vbll_logdiag)  # vbll: log-variance for lowrank
            oracle.W_offdiag.copy_(head.vbll_lowrank)
        else:
            oracle.W_logdiag.copy_(head.vbll_logdiag)  # vbll: log-std for diagonal and dense
        if cfg.cov == "dense":
            oracle.W_offdiag.copy_(head.vbll_offdiag)
    return oracle


@pytest.mark.parametrize("cov", COVS)
def test_matches_vbll_package(cov):
    head = make_head(cov)
    oracle = _oracle(head)
    assert oracle.prior_scale == pytest.approx(head.prior_var)
    phi, labels, _ = batch()  # no padding: vbll has no masking

    # training loss: vbll omits the KL's -d constant (K*d/2, weighted 1/N)
    ours = head.loss(phi, labels)
    theirs = oracle(phi).train_loss_fn(labels)
    const = head.num_classes * head.in_features / (2 * head.dataset_size)
    torch.testing.assert_close(ours, theirs - const, rtol=1e-12, atol=1e-12)

    # same gradients (lowrank logdiag: ours = 2 x theirs by the chain rule of the log-var mapping)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(head.vbll_mean.grad, oracle.W_mean.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(head.vbll_noise_logstd.grad, oracle.noise_logdiag.grad, rtol=1e-9, atol=1e-12)
    factor = 2.0 if cov == "lowrank" else 1.0
    torch.testing.assert_close(head.vbll_logdiag.grad, factor * oracle.W_logdiag.grad, rtol=1e-9, atol=1e-12)
    if cov == "lowrank":
        torch.testing.assert_close(head.vbll_lowrank.grad, oracle.W_offdiag.grad, rtol=1e-9, atol=1e-12)
    if cov == "dense":
        torch.testing.assert_close(head.vbll_offdiag.grad, oracle.W_offdiag.grad, rtol=1e-9, atol=1e-12)

    # predictive: the Gaussian logit distribution exactly, the probabilities by (many-sample) MC
    with torch.no_grad():
        pred = oracle.logit_predictive(phi)
        mean, var = head.logit_moments(phi)
        torch.testing.assert_close(mean, pred.mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(var, pred.covariance_diagonal, rtol=1e-12, atol=1e-12)
        torch.manual_seed(0)
        p_theirs = oracle.predictive(phi, n_samples=200_000)
        p_ours = head.predict_proba(phi, method="mc", n_samples=200_000)
        torch.testing.assert_close(p_ours, p_theirs, rtol=0, atol=5e-3)
        # val_loss_fn is the NLL of vbll's MC predictive; give it enough samples to be comparable
        oracle.predictive = lambda x, n_samples=200_000: type(oracle).predictive(oracle, x, n_samples)
        nll_theirs = oracle(phi).val_loss_fn(labels)
        nll_ours = -torch.log(p_ours[torch.arange(B), labels]).mean()
        torch.testing.assert_close(nll_ours, nll_theirs, rtol=0, atol=1e-2)


def test_kl_weight_is_exactly_one_over_n():
    phi, labels, n_choices = batch()
    base = make_head("lowrank", n=100)
    doubled = make_head("lowrank", n=200)  # same seed: identical parameters
    data = base.data_loss(phi, labels, n_choices)
    reg_numer = base.kl() - base.noise_log_prior()
    assert reg_numer.abs() > 1.0  # the test would be vacuous if the regulariser were ~0
    torch.testing.assert_close(base.loss(phi, labels, n_choices) - data, reg_numer / 100, rtol=1e-12, atol=0)
    reg_base = base.loss(phi, labels, n_choices) - data
    reg_doubled = doubled.loss(phi, labels, n_choices) - doubled.data_loss(phi, labels, n_choices)
    torch.testing.assert_close(reg_doubled, reg_base / 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(base.regularizer(), reg_numer / 100, rtol=1e-12, atol=0)


# ----- masking


@pytest.mark.parametrize("cov", COVS)
def test_padding_classes_masked(cov):
    k_small = 3
    head = make_head(cov, k=5)
    small = VBLLHead(D, k_small, N, {**CFG, "cov": cov}, dtype=torch.float64)
    with torch.no_grad():
        for name, p in small.named_parameters():
            p.copy_(getattr(head, name)[:k_small])
    phi, _, _ = batch(k=5)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    n_choices = torch.full((B,), k_small)
    for method in ("mc", "probit"):
        p = head.predict_proba(phi, n_choices, method=method)
        assert torch.all(p[:, k_small:] == 0)
        torch.testing.assert_close(p.sum(-1), torch.ones(B, dtype=torch.float64))
        torch.testing.assert_close(
            p[:, :k_small], small.predict_proba(phi, method=method), rtol=1e-12, atol=1e-14
        )
    # the data term is that of the unpadded head; the regulariser covers every row of the head it belongs to
    torch.testing.assert_close(
        head.data_loss(phi, labels, n_choices), small.data_loss(phi, labels), rtol=1e-12, atol=1e-14
    )
    torch.testing.assert_close(
        head.loss(phi, labels, n_choices) - head.regularizer(),
        small.loss(phi, labels) - small.regularizer(),
        rtol=1e-12,
        atol=1e-14,
    )
    # the padding rows get no gradient from the data
    head.data_loss(phi, labels, n_choices).backward()
    for _, param in head.named_parameters():
        assert torch.all(param.grad[k_small:] == 0)
        assert param.grad[:k_small].abs().sum() > 0


def test_invalid_labels_and_choices_refused():
    head = make_head("diagonal")
    phi = torch.randn(2, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="example 1"):
        head.loss(phi, torch.tensor([0, 3]), torch.tensor([4, 3]))
    with pytest.raises(ValueError, match="n_choices"):
        head.predict_proba(phi, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="phi must have shape"):
        head.predict_proba(torch.randn(2, D + 1))


# ----- predictive


def _gauss_hermite_binary(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """P(y=0) for K=2: E[sigmoid(z0 - z1)], z0 - z1 ~ N(mu0 - mu1, v0 + v1), by 200-point Gauss-Hermite."""
    x, w = np.polynomial.hermite.hermgauss(200)
    mean, var = mean.detach(), var.detach()
    mu = (mean[:, 0] - mean[:, 1]).numpy()[:, None]
    sd = np.sqrt((var[:, 0] + var[:, 1]).numpy())[:, None]
    p0 = (w * (1 / (1 + np.exp(-(mu + math.sqrt(2) * sd * x))))).sum(-1) / math.sqrt(math.pi)
    return torch.from_numpy(np.stack([p0, 1 - p0], -1))


def test_mc_predictive_converges_to_quadrature():
    head = make_head("lowrank", k=2, noise_init=1.0)
    phi = 2.0 * batch(k=2)[0]
    mean, var = head.logit_moments(phi)
    assert var.min() > 0.3  # a genuinely non-trivial integral
    exact = _gauss_hermite_binary(mean, var)
    err_small = (head.predict_proba(phi, method="mc", n_samples=1_000) - exact).abs().max()
    err_large = (head.predict_proba(phi, method="mc", n_samples=400_000) - exact).abs().max()
    assert err_large < 2.5e-3
    assert err_large < err_small
    # the softmax of the mean (no marginalisation) is measurably wrong here
    assert (torch.softmax(mean, -1) - exact).abs().max() > 0.02


def test_mc_predictive_three_classes_matches_large_sample():
    gen = torch.Generator().manual_seed(5)
    mean = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    var = torch.rand(6, 3, generator=gen, dtype=torch.float64) * 2
    z = mean + var.sqrt() * torch.randn(400_000, 6, 3, generator=gen, dtype=torch.float64)
    ref = torch.softmax(z, -1).mean(0)
    torch.testing.assert_close(mc_softmax(mean, var, 200_000, seed=1), ref, rtol=0, atol=3e-3)


def test_mc_reproducible_and_batch_independent():
    head = make_head("diagonal", noise_init=1.0)
    phi, _, n_choices = batch()
    a = head.predict_proba(phi, n_choices, method="mc")
    b = head.predict_proba(phi, n_choices, method="mc")
    assert torch.equal(a, b)
    single = torch.cat(
        [head.predict_proba(phi[i : i + 1], n_choices[i : i + 1], method="mc") for i in range(B)]
    )
    torch.testing.assert_close(a, single, rtol=1e-12, atol=1e-15)
    # a different seed gives (slightly) different numbers: the seed is really used
    other = VBLLHead(D, K, N, {**CFG, "cov": "diagonal", "mc_seed": 1}, dtype=torch.float64)
    other.load_state_dict(head.state_dict())
    assert not torch.equal(other.predict_proba(phi, n_choices, method="mc"), a)


def test_probit_zero_variance_is_softmax_and_close_to_mc_for_small_variance():
    gen = torch.Generator().manual_seed(3)
    mean = 2 * torch.randn(5, 4, generator=gen, dtype=torch.float64)
    zero = torch.zeros_like(mean)
    assert torch.equal(probit_softmax(mean, zero), torch.softmax(mean, -1))
    torch.testing.assert_close(mc_softmax(mean, zero, 100), torch.softmax(mean, -1), rtol=1e-12, atol=1e-14)
    small = 1e-3 * torch.rand(5, 4, generator=gen, dtype=torch.float64)
    mc = mc_softmax(mean, small, 200_000)
    assert (probit_softmax(mean, small) - mc).abs().max() < 2e-3
    big = 4.0 + zero
    assert (probit_softmax(mean, big) - torch.softmax(mean, -1)).abs().max() > 0.05


def test_probit_is_the_pi_over_8_approximation():
    """K=2 with class 1 fixed at logit 0 (variance 0): probit gives MacKay's sigmoid(m / sqrt(1 + pi v / 8)),
    within 0.005 of the exact E[sigmoid(z)] here (pi/4 or pi/16 would be off by > 0.04)."""
    mean = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [0.5, 0.0]], dtype=torch.float64)
    var = torch.tensor([[4.0, 0.0], [9.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    p = probit_softmax(mean, var)
    torch.testing.assert_close(p[:, 0], torch.sigmoid(mean[:, 0] / torch.sqrt(1 + math.pi / 8 * var[:, 0])))
    assert (p - _gauss_hermite_binary(mean, var)).abs().max() < 5e-3


@pytest.mark.parametrize("cov", COVS)
def test_zero_variance_equals_deterministic_head(cov):
    head = make_head(cov)
    with torch.no_grad():  # S_k = 0 and sigma = 0 exactly (exp(-inf) = 0)
        head.vbll_logdiag.fill_(float("-inf"))
        head.vbll_noise_logstd.fill_(float("-inf"))
        if cov == "lowrank":
            head.vbll_lowrank.zero_()
        if cov == "dense":
            head.vbll_offdiag.zero_()
    phi, _, n_choices = batch()
    det = DeterministicHead(head.vbll_mean.detach().float())
    expected = det.predict_proba(phi.float(), n_choices).double()
    mean, var = head.logit_moments(phi, n_choices)
    assert torch.all(var == 0)
    for method in ("mc", "probit"):
        torch.testing.assert_close(
            head.predict_proba(phi, n_choices, method=method), expected, rtol=1e-5, atol=1e-6
        )


def test_from_weight_starts_at_zero_shot():
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(5, 32, generator=gen) * 0.3
    head = VBLLHead.from_weight(weight, dataset_size=100, config={"init_cov_scale": 1e-6, "noise_init": 1e-4})
    assert head.num_classes == 5 and head.in_features == 32
    assert torch.equal(head.vbll_mean.detach(), weight)
    phi = torch.randn(8, 32, generator=gen)
    n_choices = torch.tensor([5, 5, 4, 3, 5, 2, 5, 4])
    expected = DeterministicHead(weight).predict_proba(phi, n_choices)
    for method in ("mc", "probit"):
        torch.testing.assert_close(
            head.predict_proba(phi, n_choices, method=method), expected, rtol=0, atol=1e-4
        )
    # default init: the covariance at the prior (init_cov_scale 1, as the vbll package)
    default = VBLLHead.from_weight(weight, dataset_size=100)
    torch.testing.assert_close(
        default.covariance_diagnostics()["max_var"],
        torch.full((5,), default.prior_var),
        rtol=1e-5,
        atol=0,
    )


def test_ood_scores():
    head = make_head("diagonal")
    phi, _, n_choices = batch()
    scores = head.ood_scores(phi, n_choices)
    probs = head.predict_proba(phi, n_choices)
    _, var = head.logit_moments(phi, n_choices)
    torch.testing.assert_close(scores["msp"], 1 - probs.max(-1).values)
    ent = -(probs[probs > 0] * probs[probs > 0].log())
    torch.testing.assert_close(scores["entropy"].sum(), ent.sum())
    valid = torch.arange(K) < n_choices[:, None]
    torch.testing.assert_close(scores["logit_var"], (var * valid).sum(-1))
    # more posterior variance -> higher variance score
    with torch.no_grad():
        head.vbll_logdiag.add_(1.0)
    assert torch.all(head.ood_scores(phi, n_choices)["logit_var"] > scores["logit_var"])


# ----- numerics and parameters


@pytest.mark.parametrize("cov", COVS)
def test_fp32_math_with_bf16_features(cov):
    head = VBLLHead(D, K, N, {**CFG, "cov": cov})  # fp32 parameters
    phi, labels, n_choices = batch(dtype=torch.float32)
    phi_bf16 = phi.to(torch.bfloat16)
    mean, var = head.logit_moments(phi_bf16, n_choices)
    assert mean.dtype == var.dtype == torch.float32
    ref_mean, ref_var = head.logit_moments(phi_bf16.float(), n_choices)
    assert torch.equal(mean, ref_mean) and torch.equal(var, ref_var)
    loss = head.loss(phi_bf16, labels, n_choices)
    assert loss.dtype == torch.float32
    assert torch.equal(loss, head.loss(phi_bf16.float(), labels, n_choices))
    assert head.predict_proba(phi_bf16, n_choices).dtype == torch.float32
    # an enclosing bf16 autocast region does not lower the head's precision
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto_mean, auto_var = head.logit_moments(phi, n_choices)
        auto_loss = head.loss(phi, labels, n_choices)
    assert auto_mean.dtype == torch.float32
    assert torch.equal(auto_var, head.logit_moments(phi, n_choices)[1])
    assert torch.equal(auto_loss, head.loss(phi, labels, n_choices))


@pytest.mark.parametrize("cov", COVS)
def test_gradients_reach_every_parameter(cov):
    head = VBLLHead(D, K, N, {**CFG, "cov": cov})
    names = [n for n, _ in head.named_parameters()]
    assert all(n.startswith("vbll_") for n in names)
    assert {"vbll_mean", "vbll_logdiag", "vbll_noise_logstd"} <= set(names)
    phi, labels, n_choices = batch(dtype=torch.float32)
    head.loss(phi, labels, n_choices).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    if cov == "dense":  # the used (strictly lower) part gets gradient, the unused part none
        lower = torch.tril(torch.ones(D, D, dtype=torch.bool), -1)
        assert torch.all(head.vbll_offdiag.grad[:, lower] != 0)
        assert torch.all(head.vbll_offdiag.grad[:, ~lower] == 0)
    assert sum(p.numel() for p in head.parameters()) == vbll_parameter_count(D, K, head.config)
    (group,) = head.parameter_groups(lr=1e-3)
    assert group["weight_decay"] == 0.0 and group["lr"] == 1e-3
    assert {id(p) for p in group["params"]} == {id(p) for p in head.parameters()}


@pytest.mark.parametrize("cov", COVS)
def test_check_positive_definite(cov):
    head = make_head(cov)
    head.check_positive_definite(step=3)  # healthy: no error
    diag = head.covariance_diagnostics()
    eig_min = torch.linalg.eigvalsh(head.covariance()).min(-1).values
    if cov != "dense":
        assert torch.all(diag["min_eig_lower_bound"] <= eig_min * (1 + 1e-12))
    if cov == "diagonal":
        torch.testing.assert_close(diag["min_eig_lower_bound"], eig_min)
    torch.testing.assert_close(diag["logdet"], torch.logdet(head.covariance()))
    cov_param = {"diagonal": "vbll_logdiag", "lowrank": "vbll_lowrank", "dense": "vbll_offdiag"}[cov]
    with torch.no_grad():
        getattr(head, cov_param)[2, 4].fill_(float("nan"))  # row 4 > 0: inside the used lower triangle
    with pytest.raises(RuntimeError, match=r"class 2 .*step 17"):
        head.check_positive_definite(step=17)
    head = make_head(cov)
    with torch.no_grad():
        head.vbll_logdiag[1, 0] = -1e4  # the variance underflows to 0: S_1 is singular
    with pytest.raises(RuntimeError, match=r"class 1 .*step 5"):
        head.check_positive_definite(step=5)
    head = make_head(cov)
    with torch.no_grad():
        head.vbll_noise_logstd[3] = float("inf")
    with pytest.raises(RuntimeError, match=r"class 3 .*step 9.*noise"):
        head.check_positive_definite(step=9)


# ----- configuration


def test_large_dense_refused_before_allocating(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("allocated a tensor before refusing the dense head")

    for fn in ("randn", "zeros", "full", "empty"):
        monkeypatch.setattr(torch, fn, boom)
    with pytest.raises(ConfigError) as exc:
        VBLLHead(4096, 5, 1000, {"cov": "dense"})
    msg = str(exc.value)
    assert "83,886,080 parameters" in msg and "336 MB" in msg and "allow_large_dense" in msg
    monkeypatch.undo()
    # allowed on request, with a warning stating the cost (limit lowered so the test stays small)
    monkeypatch.setattr(vbll_mod, "DENSE_MAX_PARAMS", 100)
    with pytest.warns(UserWarning, match="MB in fp32"):
        head = VBLLHead(8, 2, 10, {"cov": "dense", "allow_large_dense": True})
    assert head.vbll_offdiag.shape == (2, 8, 8)
    with pytest.raises(ConfigError, match="allow_large_dense"):
        VBLLHead(8, 2, 10, {"cov": "dense"})
    VBLLHead(8, 2, 10, {"cov": "lowrank"})  # other forms are never refused


@pytest.mark.parametrize(
    "field,value",
    [
        ("prior_scale", 0.0),
        ("prior_scale", -1.0),
        ("prior_scale", float("nan")),
        ("noise_init", float("inf")),
        ("noise_init", 0.0),
        ("wishart_scale", 0.0),
        ("dof", -2.0),
        ("init_cov_scale", 0.0),
        ("cov_rank", 0),
        ("cov_rank", True),
        ("mc_samples", 0),
        ("cov", "full"),
        ("predictive", "laplace"),
        ("no_such_field", 1),
    ],
)
def test_bad_config_refused_naming_field(field, value):
    with pytest.raises(ValidationError, match=field):
        VBLLConfig(**{field: value})
    with pytest.raises(ConfigError, match=rf"head\.vbll[\s\S]*{field}"):
        vbll_config_from_dict({field: value}, where="head.vbll")
    with pytest.raises(ConfigError, match=field):
        VBLLHead(4, 2, 10, {field: value})


@pytest.mark.parametrize("n", [0, -5, 2.5, True, None])
def test_bad_dataset_size_refused(n):
    with pytest.raises(ConfigError, match="dataset_size"):
        VBLLHead(4, 2, n)


def test_prior_mean_init_centres_the_kl_on_the_starting_rows():
    """prior_mean=init: KL = 1/2 sum_k [||m_k - w_k||^2/s_p + tr S_k/s_p - log|S_k| + d log s_p - d]; it is
    the zero-mean KL minus the mean term, plus the shifted one (float64 check by hand)."""
    torch.manual_seed(0)
    w = torch.randn(3, 5, dtype=torch.float64)
    zero = VBLLHead.from_weight(w, dataset_size=10, config={"prior_scale": 2.0}, dtype=torch.float64)
    init = VBLLHead.from_weight(
        w, dataset_size=10, config={"prior_scale": 2.0, "prior_mean": "init"}, dtype=torch.float64
    )
    s_p = 2.0 * 2 / 5
    # at the start the means sit on the prior mean: the whole mean term vanishes
    torch.testing.assert_close(zero.kl() - init.kl(), 0.5 * w.square().sum() / s_p)
    with torch.no_grad():
        init.vbll_mean.add_(1.0)
        zero.vbll_mean.add_(1.0)
    torch.testing.assert_close(zero.kl() - init.kl(), 0.5 * ((w + 1).square().sum() - 15.0) / s_p)
    assert "vbll_prior_mean" in init.state_dict()


def test_jensen_gap_against_a_quadrature_oracle():
    """K = 2: the exact data term is E[softplus(-(z_y - z_o))] with z_y - z_o ~ N(m_y - m_o, v_y + v_o), a 1-D
    Gauss-Hermite integral (float64, 80 nodes). The bound is above it; the Monte Carlo estimate matches it."""
    import numpy as np

    from polar_vbll.heads.features import FeatureMapConfig
    from polar_vbll.heads.vbll import VBLLHead

    g = torch.Generator().manual_seed(7)
    n, d = 30, 5
    phi = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (n,), generator=g)
    head = VBLLHead(d, 2, n, features=FeatureMapConfig(), dtype=torch.float64)
    with torch.no_grad():
        head.vbll_mean.copy_(torch.randn(head.vbll_mean.shape, generator=g, dtype=torch.float64))
        head.vbll_logdiag.fill_(-0.3)
    c = torch.full((n,), 2)
    mean, var = head.logit_moments(phi, c)
    nodes, weights = np.polynomial.hermite.hermgauss(80)
    exact = 0.0
    for i in range(n):
        yi, oi = int(y[i]), 1 - int(y[i])
        mu, s = float(mean[i, yi] - mean[i, oi]), float((var[i, yi] + var[i, oi]).sqrt())
        vals = np.logaddexp(0.0, -(mu + np.sqrt(2.0) * s * nodes))
        exact += float((weights * vals).sum() / np.sqrt(np.pi)) / n
    got = head.jensen_gap(phi, y, c, n_samples=20000, seed=1)
    bound = float(head.data_loss(phi, y, c))
    assert got["bound"] == pytest.approx(bound, rel=1e-12) and got["bound"] > exact
    assert got["mc"] == pytest.approx(exact, abs=0.01)  # 20,000 draws per example over 30 examples
    assert got["gap"] == pytest.approx(bound - exact, abs=0.01) and got["gap"] > 0.05


def test_the_mc_elbo_estimates_the_exact_data_term_and_has_finite_gradients_with_padding():
    """``elbo: mc``: its data term converges to the exact expected NLL (the quadrature oracle of the Jensen
    gap test, via ``jensen_gap``'s independent estimate), lies below the Jensen bound, repeats exactly at
    every call, and back-propagates finite gradients through padding classes."""
    from polar_vbll.heads.features import FeatureMapConfig
    from polar_vbll.heads.vbll import VBLLHead

    g = torch.Generator().manual_seed(3)
    n, d, k = 40, 4, 4
    phi = torch.randn(n, d, generator=g, dtype=torch.float64)
    c = torch.tensor([3 if i % 2 else 4 for i in range(n)])
    y = torch.stack([torch.randint(0, int(ci), (1,), generator=g)[0] for ci in c])
    mc = VBLLHead(d, k, n, {"elbo": "mc", "elbo_samples": 20000, "mc_seed": 5}, features=FeatureMapConfig(),
                  dtype=torch.float64)  # fmt: skip
    jensen = VBLLHead(d, k, n, {"elbo": "jensen"}, features=FeatureMapConfig(), dtype=torch.float64)
    with torch.no_grad():
        w = torch.randn(mc.vbll_mean.shape, generator=g, dtype=torch.float64)
        for h in (mc, jensen):
            h.vbll_mean.copy_(w)
            h.vbll_logdiag.fill_(-0.2)
    oracle = jensen.jensen_gap(phi, y, c, n_samples=20000, seed=9)  # other draws: an independent estimate
    est = mc.data_loss(phi, y, c)
    assert float(est) == pytest.approx(oracle["mc"], abs=0.01)
    assert float(est) < float(jensen.data_loss(phi, y, c)) - 0.05
    assert float(mc.data_loss(phi, y, c)) == float(est)  # common random numbers
    small = VBLLHead(d, k, n, {"elbo": "mc", "elbo_samples": 8}, features=FeatureMapConfig(), dtype=torch.float64)
    small.loss(phi, y, c).backward()
    assert all(torch.isfinite(p.grad).all() for p in small.parameters() if p.grad is not None)
