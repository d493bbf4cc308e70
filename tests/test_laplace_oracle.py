"""LL-Laplace against the reference implementation laplace-torch (a dev-only oracle, Daxberger et al.
2021): the same posterior precision, the same log marginal likelihood at any prior precision, and the same
probit predictive, on raw features and through the linear head's feature map (standardised + bias)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polar_vbll.heads.features import FeatureMapConfig
from polar_vbll.heads.laplace import LastLayerLaplace
from polar_vbll.heads.linear import LinearHead

laplace = pytest.importorskip("laplace", reason="laplace-torch is a dev-only oracle (scripts/setup.sh installs it)")

N, D, K = 80, 5, 3


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (N,), generator=g)
    w = 0.5 * torch.randn(K, D, generator=g, dtype=torch.float64)
    return x, y, w


def _reference(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, prior_precision: float):
    """laplace-torch's full-Hessian Laplace over all weights of a bias-free linear layer on ``x``."""
    model = nn.Linear(w.shape[1], w.shape[0], bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    la = laplace.Laplace(model, "classification", subset_of_weights="all", hessian_structure="full",
                         prior_precision=prior_precision)  # fmt: skip
    la.fit(loader)
    return la


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_posterior_evidence_and_predictive_match_laplace_torch():
    x, y, w = _data()
    ours = LastLayerLaplace(w, None, structure="full", prior_precision=2.0).fit(x, y, torch.full((N,), K))
    ref = _reference(x, y, w, 2.0)
    precision = ours.hessian() + 2.0 * torch.eye(K * D, dtype=torch.float64)
    torch.testing.assert_close(precision, ref.posterior_precision.double(), rtol=1e-6, atol=1e-5)
    probs = ref(x[:20], pred_type="glm", link_approx="probit")
    torch.testing.assert_close(ours.predict_proba(x[:20], torch.full((20,), K)), probs.float(), rtol=1e-5, atol=1e-6)
    for lam in (0.05, 1.0, 30.0):  # (the reference's call also sets its prior precision)
        mine = ours.log_marginal_likelihood(lam)
        theirs = float(ref.log_marginal_likelihood(prior_precision=torch.tensor(lam, dtype=torch.float64)))
        assert mine == pytest.approx(theirs, rel=1e-6, abs=1e-5), lam


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_evidence_optimum_matches_laplace_torch_marglik_tuning():
    x, y, w = _data(seed=1)
    ours = LastLayerLaplace(w, None, structure="full").fit(x, y, torch.full((N,), K))  # evidence-optimal
    ref = _reference(x, y, w, 1.0)
    ref.optimize_prior_precision(method="marglik", n_steps=2000, lr=0.05)
    assert ours.prior_precision == pytest.approx(float(ref.prior_precision), rel=2e-2)
    # and ours is the exact maximiser: the reference's evidence is no higher at its own optimum
    assert ours.log_marginal_likelihood() >= ours.log_marginal_likelihood(float(ref.prior_precision)) - 1e-9


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_through_the_linear_heads_feature_map():
    """A trained linear head's Laplace (standardised features + bias column in the posterior) equals
    laplace-torch on the mapped features with the head's weight."""
    g = torch.Generator().manual_seed(2)
    phi = 30 + 8 * torch.randn(N, D, generator=g)  # raw, badly scaled features
    y = torch.randint(0, K, (N,), generator=g)
    head = LinearHead(torch.randn(K, D, generator=g), dataset_size=N, features=FeatureMapConfig())
    head.fit_features(phi)
    ours = LastLayerLaplace.from_head(head, prior_precision=3.0).fit(phi, y, torch.full((N,), K))
    with torch.no_grad():
        x = head.feature_map(phi.double())
    ref = _reference(x, y, head.weight.detach().double(), 3.0)
    precision = ours.hessian() + 3.0 * torch.eye(K * (D + 1), dtype=torch.float64)
    torch.testing.assert_close(precision, ref.posterior_precision.double(), rtol=1e-6, atol=1e-5)
    probs = ref(x[:10], pred_type="glm", link_approx="probit")
    torch.testing.assert_close(ours.predict_proba(phi[:10], torch.full((10,), K)), probs.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_polar_vbll_la_is_laplace_centred_at_the_vbll_mean():
    """The hybrid's post-hoc head (HEADS["vbll_la"]) equals laplace-torch's Laplace on the VBLL head's own
    features with the VBLL mean rows as the weights, at the prior precision our evidence chose."""
    from polar_vbll.config import parse_config
    from polar_vbll.heads.vbll import VBLLHead
    from polar_vbll.methods import HEADS, METHODS

    g = torch.Generator().manual_seed(4)
    phi = 5 + 3 * torch.randn(N, D, generator=g)
    y = torch.randint(0, K, (N,), generator=g)
    head = VBLLHead(D, K, N, features=FeatureMapConfig())
    head.fit_features(phi)
    with torch.no_grad():
        head.vbll_mean.copy_(torch.randn(head.vbll_mean.shape, generator=g))
    cfg = parse_config({"method": "polar_vbll_la"})
    assert METHODS["polar_vbll_la"].head_kind.training_kind == "vbll"  # trains exactly as polar_vbll
    ours = HEADS["vbll_la"].posthoc(cfg, head, phi, y, torch.full((N,), K))
    with torch.no_grad():
        x = head.feature_map(phi.double())
    ref = _reference(x, y, head.vbll_mean.detach().double(), ours.prior_precision)
    precision = ours.hessian() + ours.prior_precision * torch.eye(K * (D + 1), dtype=torch.float64)
    torch.testing.assert_close(precision, ref.posterior_precision.double(), rtol=1e-6, atol=1e-5)
    probs = ref(x[:20], pred_type="glm", link_approx="probit")
    torch.testing.assert_close(ours.predict_proba(phi[:20], torch.full((20,), K)), probs.float(), rtol=1e-5, atol=1e-6)
    # the evidence chose the prior: no better evidence at a neighbouring precision
    lam = ours.prior_precision
    assert ours.log_marginal_likelihood() >= max(ours.log_marginal_likelihood(lam * 1.5),
                                                 ours.log_marginal_likelihood(lam / 1.5))  # fmt: skip
