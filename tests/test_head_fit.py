"""The scale-aware Bayesian head and the convergent eta-phase (issue 12), against independent references:
an L2 logistic regression solved by scipy in numpy (the MAP oracle), a numeric optimum of the ELBO over
the prior variance, affine rescalings of the features, and hand-computed guard and temperature values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize, minimize_scalar

from polar_vbll.config import HeadFitConfig
from polar_vbll.guards import at_chance, chance_reference
from polar_vbll.heads.deterministic import DeterministicHead
from polar_vbll.heads.features import FeatureMap, FeatureMapConfig
from polar_vbll.heads.fit import fit_to_convergence
from polar_vbll.heads.linear import LinearHead
from polar_vbll.heads.probe import fit_probe
from polar_vbll.heads.vbll import VBLLHead
from polar_vbll.temperature import apply_temperature, fit_temperature
from polar_vbll.training.coordinator import HeadCoordinator

N, D, K = 400, 6, 3
STD = FeatureMapConfig(standardize=True, bias=True)


def _data(seed: int = 0, n: int = N, d: int = D, k: int = K, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    w = torch.randn(k, d, generator=g, dtype=dtype)
    y = torch.distributions.Categorical(logits=(x @ w.T).double()).sample()
    return x, y, torch.full((n,), k)


def _l2_logistic_map(x: np.ndarray, y: np.ndarray, k: int, prior_var: float) -> np.ndarray:
    """The oracle: argmin_W sum_b CE(W x_b, y_b) + ||W||^2 / (2 prior_var), by scipy's L-BFGS-B in numpy."""
    n, d = x.shape

    def f(w):
        wm = w.reshape(k, d)
        z = x @ wm.T
        z = z - z.max(1, keepdims=True)
        lse = np.log(np.exp(z).sum(1))
        p = np.exp(z - lse[:, None])
        grad = (p - np.eye(k)[y]).T @ x + wm / prior_var
        return (lse - z[np.arange(n), y]).sum() + 0.5 * (w**2).sum() / prior_var, grad.ravel()

    r = minimize(f, np.zeros(k * d), jac=True, method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15})
    return r.x.reshape(k, d)


@pytest.mark.parametrize("prior_scale", [1.0, 0.1])
def test_one_eta_phase_puts_the_vbll_mean_at_the_l2_logistic_map(prior_scale):
    """Diagonal VBLL, one full eta-phase on fixed features: the posterior mean is the MAP of an L2
    logistic regression with prior precision 1/s_p, within 1% of the MAP's largest weight (the Jensen
    bound's per-class variance terms are the only difference; they are small when N >> D)."""
    x, y, c = _data()
    head = VBLLHead(D, K, N, {"prior_scale": prior_scale, "noise_init": 1e-2}, dtype=torch.float64)
    coordinator = HeadCoordinator(head, HeadFitConfig())
    coordinator.refit(x, y, c)
    report = coordinator.last_report
    assert report["converged"] and report["grad_max"] <= 1e-6 and 0 < report["iterations"] < 500
    oracle = _l2_logistic_map(x.numpy(), y.numpy(), K, head.prior_var)
    err = np.abs(head.vbll_mean.detach().numpy() - oracle).max() / np.abs(oracle).max()
    assert err < 0.01, err


def test_the_empirical_bayes_update_is_the_elbo_optimum_over_the_prior_variance():
    """With q fixed, the closed-form update equals the numeric minimiser of the negative ELBO over s_p."""
    x, y, c = _data(seed=1)
    for cov in ("diagonal", "lowrank", "dense"):
        head = VBLLHead(D, K, N, {"cov": cov, "cov_rank": 2}, dtype=torch.float64, features=STD)
        head.fit_features(x)
        fit_to_convergence(head, x, y, c, max_iter=50)  # some posterior, not the prior

        def neg_elbo(log_sp: float, head=head) -> float:
            head.set_prior_var(math.exp(log_sp))
            with torch.no_grad():
                return float(head.loss(x, y, c))

        closed = head.empirical_bayes_prior_var()
        numeric = math.exp(minimize_scalar(neg_elbo, bounds=(-15, 5), method="bounded",
                                           options={"xatol": 1e-10}).x)  # fmt: skip
        assert closed == pytest.approx(numeric, rel=1e-5), cov


def test_empirical_bayes_reaches_a_fixed_point_of_its_update():
    x, y, c = _data(seed=2)
    head = VBLLHead(D, K, N, {"prior_fit": "empirical_bayes"}, dtype=torch.float64, features=STD)
    coordinator = HeadCoordinator(head, HeadFitConfig(prior_rounds=200, prior_tolerance=1e-6))
    coordinator.refit(x, y, c)
    report = coordinator.last_report
    assert report["prior_rounds"] > 0 and report["converged"]
    assert head.empirical_bayes_prior_var() == pytest.approx(head.prior_var, rel=1e-4)


def _affine(x: torch.Tensor, seed: int = 7) -> torch.Tensor:
    """A per-feature positive rescaling and a shift, far from unit scale (like an LLM's hidden state)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.exp(3 * torch.randn(x.shape[1], generator=g, dtype=x.dtype))
    return a * x + 40 * torch.randn(x.shape[1], generator=g, dtype=x.dtype)


@pytest.mark.parametrize("standardize", [True, False])
def test_predictions_are_invariant_to_an_affine_rescaling_of_the_features(standardize):
    x, y, c = _data(seed=3, n=300)
    test, _, tc = _data(seed=4, n=50)
    probs = []
    for transform in (lambda t: t, _affine):
        fm = FeatureMapConfig(standardize=standardize, bias=True)
        head = VBLLHead(D, K, 300, {}, dtype=torch.float64, features=fm)
        HeadCoordinator(head, HeadFitConfig()).refit(transform(x), y, c)
        probs.append(head.predict_proba(transform(test), tc, method="probit"))
    if standardize:  # the same problem up to round-off: equal to what the gradient tolerance (1e-6) leaves
        torch.testing.assert_close(probs[0], probs[1], rtol=0, atol=1e-4)
    else:  # the control: without standardisation the same prior means something else on rescaled features
        assert (probs[0] - probs[1]).abs().max() > 1e-2


def test_the_feature_map_reexpresses_raw_weights_exactly():
    x, _, _ = _data(seed=5)
    x = _affine(x)
    fmap = FeatureMap(D, STD, dtype=torch.float64)
    w, b = torch.randn(K, D, dtype=torch.float64), torch.randn(K, dtype=torch.float64)
    fmap.fit(x)
    torch.testing.assert_close(fmap(x) @ fmap.from_raw(w, b).T, x @ w.T + b)
    w_raw, b_raw = fmap.to_raw(fmap.from_raw(w, b))
    torch.testing.assert_close(w_raw, w)
    torch.testing.assert_close(b_raw, b)


def test_a_linear_head_starts_at_the_zero_shot_model_before_and_after_its_statistics():
    x, _, c = _data(seed=6, dtype=torch.float32)
    x = _affine(x)
    rows = torch.randn(K, D)
    zero_shot = DeterministicHead(rows).predict_proba(x, c)
    head = LinearHead(rows, dataset_size=N, features=STD, prior="gaussian")
    torch.testing.assert_close(head.predict_proba(x, c), zero_shot)
    head.fit_features(x)
    assert bool(head.feature_map.fitted)
    torch.testing.assert_close(head.predict_proba(x, c), zero_shot, rtol=1e-4, atol=1e-5)
    # the MAP penalty is the Gaussian prior's negative log density per example (constant dropped)
    w = head.weight.detach().double()
    expected = float(w.square().sum() / (2 * head.prior_var * N))
    assert float(head.regularizer().detach()) == pytest.approx(expected, rel=1e-5)


def test_the_linear_map_head_fits_to_the_l2_logistic_oracle():
    x, y, c = _data(seed=8)
    head = LinearHead(torch.zeros(K, D), dataset_size=N, prior="gaussian", prior_scale=0.5)
    report = fit_to_convergence(head, x.float(), y, c)
    assert report.converged
    oracle = _l2_logistic_map(x.numpy(), y.numpy(), K, head.prior_var)
    assert np.abs(head.weight.detach().double().numpy() - oracle).max() < 1e-4 * np.abs(oracle).max() + 1e-5


def test_the_probe_stops_at_the_evidence_fixed_point():
    from polar_vbll.heads.laplace import LastLayerLaplace

    x, y, c = _data(seed=9, n=300)
    head = LinearHead(torch.zeros(K, D), dataset_size=300, features=STD)
    probe = fit_probe(head, x.float(), y, c, HeadFitConfig(), rounds=50, tolerance=1e-6)
    assert probe.probe_report["evidence_updates"] > 0
    la = LastLayerLaplace.from_head(probe).fit(x.float(), y, c)
    assert 1.0 / la.prior_precision == pytest.approx(probe.prior_var, rel=1e-4)
    assert not any(p.requires_grad for p in probe.parameters())


@pytest.mark.parametrize("mean", ["map", "trained"])
def test_last_layer_laplace_sits_at_a_mode_of_its_posterior_or_at_the_trained_head(mean):
    """``head.laplace.mean``: ``map`` refits the head as the evidence-optimal MAP and centres the Laplace
    posterior there: the gradient of the negative log posterior (summed cross-entropy + lam/2 ||W||^2, float64
    autograd, independent of the fit) vanishes at its mean. ``trained`` keeps the trained weights. With an
    over-confident trained head (an MLE head's weights x 20) the evidence then picks a weak prior and the
    held-out NLL is worse than at the MAP refit: the reason ``map`` is the default."""
    from types import SimpleNamespace

    from polar_vbll.config import LaplaceConfig
    from polar_vbll.methods import _fit_laplace

    x, y, c = _data(seed=11, n=300)
    g = torch.Generator().manual_seed(12)
    w_true = torch.randn(K, D, generator=g, dtype=torch.float64)
    x_test = torch.randn(2000, D, generator=g, dtype=torch.float64)
    y = torch.distributions.Categorical(logits=x @ w_true.T).sample()
    y_test = torch.distributions.Categorical(logits=x_test @ w_true.T).sample()
    head = LinearHead(torch.zeros(K, D), dataset_size=300, features=STD)
    head.fit_features(x.float())
    fit_to_convergence(head, x.float(), y, c)
    with torch.no_grad():
        head.weight.mul_(20.0)
    cfg = SimpleNamespace(head=SimpleNamespace(laplace=LaplaceConfig(mean=mean), fit=HeadFitConfig()))
    la = _fit_laplace(cfg, head, x.float(), y, c)
    if mean == "trained":
        assert torch.equal(la.weight, head.weight.detach().double())
        return
    w = la.weight.clone().requires_grad_(True)
    z = la._x(x.float()) @ w.T
    loss = torch.nn.functional.cross_entropy(z, y, reduction="sum") + 0.5 * la.prior_precision * w.square().sum()
    (grad,) = torch.autograd.grad(loss, w)
    assert grad.abs().max() < 1e-4 * (1.0 + la.prior_precision * w.abs().max().item())
    trained = _fit_laplace(
        SimpleNamespace(head=SimpleNamespace(laplace=LaplaceConfig(mean="trained"), fit=HeadFitConfig())),
        head, x.float(), y, c,
    )  # fmt: skip
    ct = torch.full((2000,), K)

    def nll(lap):
        p = lap.predict_proba(x_test.float(), ct).double()
        return -p[torch.arange(2000), y_test].clamp_min(1e-12).log().mean().item()

    assert nll(la) < nll(trained)


def test_a_non_finite_fit_is_refused():
    from polar_vbll.errors import HeadFitDiverged

    x, y, c = _data(seed=10)
    x[3, 2] = float("nan")
    with pytest.raises(HeadFitDiverged, match="non-finite"):
        fit_to_convergence(VBLLHead(D, K, N, dtype=torch.float64), x, y, c, max_iter=5)


# ------------------------------------------------------------------------------------- temperature scaling
def test_temperature_scaling_matches_a_numeric_optimum_and_keeps_the_argmax():
    g = torch.Generator().manual_seed(11)
    logits = 4 * torch.randn(500, 4, generator=g, dtype=torch.float64)  # overconfident
    y = torch.distributions.Categorical(logits=logits / 4).sample()
    probs = torch.softmax(logits, -1)
    t = fit_temperature(probs, y)

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits / math.exp(log_t), y))

    oracle = math.exp(minimize_scalar(nll, bounds=(-5, 5), method="bounded", options={"xatol": 1e-10}).x)
    assert t == pytest.approx(oracle, rel=1e-5) and t > 2
    scaled = apply_temperature(probs, t)
    torch.testing.assert_close(scaled.double(), torch.softmax(logits / t, -1), rtol=1e-5, atol=1e-6)
    assert torch.equal(scaled.argmax(-1), probs.argmax(-1))
    padded = probs.clone()
    padded[:, 3] = 0
    padded = padded / padded.sum(-1, keepdim=True)
    assert bool((apply_temperature(padded, 2.0)[:, 3] == 0).all())  # padding stays impossible


# ---------------------------------------------------------------------------------------- the guard
def test_the_chance_flag_fires_on_a_uniform_predictor_and_not_on_a_learned_one():
    g = torch.Generator().manual_seed(12)
    n = 400
    labels = torch.randint(0, 2, (n,), generator=g)
    train = torch.randint(0, 2, (300,), generator=g)
    c = torch.full((n,), 2)
    ref = chance_reference(train, labels, c, 2)
    majority = max(float((labels == 0).double().mean()), float((labels == 1).double().mean()))
    assert ref["chance_acc"] >= 0.5 and ref["chance_acc"] <= majority + 1e-12
    assert ref["chance_se"] == pytest.approx(math.sqrt(ref["chance_acc"] * (1 - ref["chance_acc"]) / n))
    assert ref["uniform"]["nll"] == pytest.approx(math.log(2))
    assert at_chance(ref["uniform"]["acc"], ref) and at_chance(ref["majority"]["acc"], ref)
    learned = labels.clone()
    learned[: n // 5] = 1 - learned[: n // 5]  # 80% right
    assert not at_chance(float((learned == labels).double().mean()), ref)


def test_the_evidence_chosen_prior_is_the_brute_force_maximiser_of_the_marginal_likelihood():
    """``prior_fit: evidence``: the variance MacKay's iteration settles on equals, within the grid's step, the
    argmax over a grid of the Laplace log evidence of the MAP refitted at each variance (brute force), and
    an eta-phase sets the VBLL head's prior to it."""
    from polar_vbll.config import HeadFitConfig
    from polar_vbll.heads.features import FeatureMapConfig
    from polar_vbll.heads.fit import fit_to_convergence
    from polar_vbll.heads.laplace import LastLayerLaplace
    from polar_vbll.heads.linear import LinearHead
    from polar_vbll.heads.probe import evidence_prior_var
    from polar_vbll.heads.vbll import VBLLHead
    from polar_vbll.training.coordinator import LocalCoordinator

    g = torch.Generator().manual_seed(11)
    n, d, k = 60, 3, 3
    w_true = torch.randn(k, d, generator=g)
    phi = 2 + torch.randn(n, d, generator=g)
    y = torch.distributions.Categorical(logits=(phi - 2) @ w_true.T).sample()
    c = torch.full((n,), k)
    fit = HeadFitConfig()
    feats = FeatureMapConfig()

    grid = torch.logspace(-1, 1.5, 51).tolist()  # step 10^0.05 = 1.12x, around the optimum (3.5)
    evidence = []
    for s in grid:
        lin = LinearHead(torch.zeros(k, d), None, dataset_size=n, features=feats, prior="gaussian")
        lin.fit_features(phi)
        lin.prior_var = s
        fit_to_convergence(lin, phi, y, c, max_iter=500, tolerance=1e-9)
        evidence.append(LastLayerLaplace.from_head(lin, prior_precision=1 / s).fit(phi, y, c).log_marginal_likelihood())
    best = grid[max(range(len(grid)), key=evidence.__getitem__)]

    head = VBLLHead(d, k, n, {"prior_fit": "evidence"}, features=feats)
    chosen = evidence_prior_var(head, phi, y, c, fit)
    assert abs(math.log(chosen / best)) <= math.log(10**0.05) * 1.01, (chosen, best)
    state, _ = LocalCoordinator(head, fit).refit(0, phi, y, c)  # on its own copy: the new state comes back
    assert float(state["vbll_prior_var"]) == pytest.approx(chosen, rel=1e-6)
