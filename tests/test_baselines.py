"""Baselines: LoRA on peft (PolarModel interface), last-layer Laplace, MC dropout, deep ensembles."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from polar_vbll.adapters import LoraAdapter, LoraConfig, PolarConfig, inject_polar, set_adapter_dropout
from polar_vbll.errors import CheckpointError, ConfigError
from polar_vbll.features import EncodedSplit, FeatureSource, split_features
from polar_vbll.heads import DeterministicHead, masked_logits
from polar_vbll.heads.laplace import LastLayerLaplace, full_ggn, kron_factors
from polar_vbll.predictives import (
    Predictions,
    ensemble_predictions,
    predict,
    predict_ensemble,
    predict_mc_dropout,
)

from .conftest import make_tiny_llama

peft = pytest.importorskip("peft")

R, ALPHA = 4, 8.0


# ------------------------------------------------------------------------------------------------ helpers
def _ids(seed: int = 1, batch: int = 2, length: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=g)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _lora(layers=None, dropout: float = 0.0, targets=("q_proj", "v_proj", "down_proj"), seed: int = 0):
    cfg = LoraConfig(r=R, alpha=ALPHA, target_modules=list(targets), layers=layers, dropout=dropout)
    return LoraAdapter(make_tiny_llama(seed=seed), cfg)


def _randomize(adapter: LoraAdapter, seed: int = 3, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.theta_parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))


def _split(n: int = 7, seed: int = 0, name: str = "val") -> EncodedSplit:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 10, (n,), generator=g).tolist()
    ids = [torch.randint(3, 128, (k,), generator=g).tolist() for k in lengths]
    n_choices = torch.tensor([3 if i % 3 == 0 else 4 for i in range(n)])
    labels = torch.stack([torch.randint(0, int(c), (1,), generator=g)[0] for c in n_choices])
    return EncodedSplit(name, ids, labels, n_choices)


def _head(d: int = 64, k: int = 4, seed: int = 5) -> DeterministicHead:
    g = torch.Generator().manual_seed(seed)
    return DeterministicHead(torch.randn(k, d, generator=g))


# =================================================================================================== LoRA
def test_lora_init_is_identity_and_only_lora_requires_grad():
    ref = make_tiny_llama(seed=0)
    adapter = _lora()
    ids = _ids()
    torch.testing.assert_close(_logits(adapter, ids), _logits(ref, ids), rtol=0, atol=0)
    assert not any(m.training for m in adapter.modules())  # eval-mode backbone: LoRA layers in eval too
    assert adapter.stiefel_parameters() == []
    assert adapter.orthogonality_error() == 0.0
    assert all(v == 0.0 for v in adapter.stable_ranks().values())  # B = 0 at init

    lora_params = {id(p) for n, p in adapter.base_model.named_parameters() if "lora_" in n}
    theta = adapter.theta_parameters()
    assert len(theta) == len(lora_params) == 2 * 3 * 2  # (A, B) x 3 targets x 2 blocks
    assert {id(p) for p in theta} == lora_params
    trainable = {id(p) for p in adapter.parameters() if p.requires_grad}
    assert trainable == lora_params
    # Same layers as PoLAR selects, and the decoder is still found where the feature code looks.
    from polar_vbll.backbone import decoder_of

    assert len(decoder_of(adapter.base_model).layers) == 2
    assert [n for n, _ in adapter.lora_layers()] == sorted(
        f"model.layers.{i}.{m}"
        for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    )


def test_lora_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a1, a2 = _lora(), _lora()
    assert torch.equal(torch.get_rng_state(), state)
    for p, q in zip(a1.theta_parameters(), a2.theta_parameters(), strict=True):
        assert torch.equal(p, q)
    a3 = LoraAdapter(
        make_tiny_llama(),
        LoraConfig(r=R, alpha=ALPHA, target_modules=["q_proj", "v_proj", "down_proj"], init_seed=1),
    )
    assert not torch.equal(a1.theta_parameters()[0], a3.theta_parameters()[0])


def test_lora_forward_matches_float64_reference():
    adapter = _lora()
    _randomize(adapter)
    name = "model.layers.0.self_attn.q_proj"
    layer = adapter.base_model.get_submodule(name)
    w0 = layer.base_layer.weight.detach().to(torch.float64)
    a = layer.lora_A["default"].weight.detach().to(torch.float64)
    b = layer.lora_B["default"].weight.detach().to(torch.float64)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    x64 = x.to(torch.float64)
    ref = x64 @ w0.T + (ALPHA / R) * (x64 @ a.T) @ b.T
    with torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out.to(torch.float64), ref, rtol=0, atol=1e-5)

    # Whole model: equal to a fresh copy of the base model with W0 + s B A written into every target.
    merged = make_tiny_llama(seed=0)
    with torch.no_grad():
        for n, a_p, b_p in adapter.lora_factors():
            w = merged.get_submodule(n).weight
            w.copy_((w.to(torch.float64) + (ALPHA / R) * b_p.double() @ a_p.double()).float())
    ids = _ids()
    torch.testing.assert_close(_logits(adapter, ids), _logits(merged, ids), rtol=0, atol=2e-4)


def test_lora_stable_rank():
    adapter = _lora(targets=("q_proj",))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, a, b in adapter.lora_factors():
            a.copy_(torch.randn(a.shape, generator=g))
            b.copy_(torch.outer(torch.randn(b.shape[0], generator=g), torch.randn(b.shape[1], generator=g)))
    ranks = adapter.stable_ranks()
    assert len(ranks) == 2
    for v in ranks.values():
        assert v == pytest.approx(1.0, abs=1e-9)
    with torch.no_grad():
        for _, _a, b in adapter.lora_factors():
            b.copy_(torch.randn(b.shape, generator=g))
    for n, v in adapter.stable_ranks().items():
        a, b = next((a, b) for m, a, b in adapter.lora_factors() if m == n)
        sv = torch.linalg.svdvals(b.detach().double() @ a.detach().double())
        assert 1.2 < v <= R + 1e-9
        assert v == pytest.approx(float(sv.square().sum() / sv[0] ** 2), rel=1e-9)


def test_lora_cached_prefix_features_match_full_path():
    adapter = _lora(layers=[-1])
    _randomize(adapter)
    enc = _split()
    idx = [0, 3, 5, 6]
    full = FeatureSource(adapter.base_model, pad_id=0, cache_prefix=False)
    cached = FeatureSource(adapter.base_model, pad_id=0, cache_prefix=True)
    assert full.split_block is None and cached.split_block == 1
    cached.prepare(enc, batch_size=3, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(cached.features(enc, idx), full.features(enc, idx), rtol=1e-5, atol=1e-5)
    # Gradients reach the LoRA factors through the cached path.
    cached.features(enc, idx).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.theta_parameters()[1::2])


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft reads it
def test_lora_save_load_round_trip_and_peft_export(tmp_path):
    adapter = _lora(layers=[-1])
    _randomize(adapter)
    ids = _ids()
    expected = _logits(adapter, ids)
    d = adapter.save_adapter(tmp_path / "adapter")
    assert (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file()

    loaded = LoraAdapter.load_adapter(make_tiny_llama(seed=0), d)
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=0, atol=0)
    for k, v in adapter.adapter_state_dict().items():
        assert torch.equal(loaded.adapter_state_dict()[k], v)

    # It is a standard PEFT adapter: peft's own loader reproduces the outputs.
    served = peft.PeftModel.from_pretrained(make_tiny_llama(seed=0), str(d))
    torch.testing.assert_close(_logits(served, ids), expected, rtol=0, atol=0)

    # In-memory round trip restores a perturbed adapter; strict about keys.
    sd = adapter.adapter_state_dict()
    _randomize(adapter, seed=9)
    adapter.load_adapter_state_dict(sd)
    torch.testing.assert_close(_logits(adapter, ids), expected, rtol=0, atol=0)
    bad = dict(sd)
    bad.pop(next(iter(bad)))
    with pytest.raises(CheckpointError, match="missing keys"):
        adapter.load_adapter_state_dict(bad)
    # A saved adapter for other layers is refused before the fresh model is touched.
    with pytest.raises(CheckpointError):
        LoraAdapter.load_adapter(make_tiny_llama(seed=0, layers=3), d)
    # An edited alpha (it scales B A without touching the weights file) or altered weights are refused.
    side = d / "lora_baseline_config.json"
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "lora_config": {**meta["lora_config"], "alpha": 64.0}}))
    with pytest.raises(CheckpointError, match="altered after it was written"):
        LoraAdapter.load_adapter(make_tiny_llama(seed=0), d)
    side.write_text(json.dumps(meta))
    weights = d / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="truncated or altered"):
        LoraAdapter.load_adapter(make_tiny_llama(seed=0), d)


def test_lora_config_errors():
    with pytest.raises(ConfigError, match="LoraConfig.target_modules"):
        LoraAdapter(make_tiny_llama(), {"target_modules": ["nope_proj"]})
    with pytest.raises(ConfigError, match="out of range"):
        LoraAdapter(make_tiny_llama(), {"layers": [5]})
    with pytest.raises(ConfigError, match="Extra inputs"):
        LoraAdapter(make_tiny_llama(), {"rank": 4})
    with pytest.raises(ConfigError, match="duplicate"):
        LoraAdapter(make_tiny_llama(), {"layers": [0, 0]})


# ================================================================================================ Laplace
def _laplace_problem(n: int = 10, k: int = 3, d: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(k, d, generator=g, dtype=torch.float64)
    b = torch.randn(k, generator=g, dtype=torch.float64)
    n_choices = torch.full((n,), k)
    n_choices[::3] = k - 1  # a padded class on some rows
    labels = torch.stack([torch.randint(0, int(c), (1,), generator=g)[0] for c in n_choices])
    return phi, w, b, labels, n_choices


def _nll_sum(w_vec, phi, b, labels, n_choices, k, d):
    z = masked_logits(phi @ w_vec.reshape(k, d).T + b, n_choices)
    return F.cross_entropy(z, labels, reduction="sum")


def test_laplace_full_hessian_equals_autograd():
    phi, w, b, labels, n_choices = _laplace_problem()
    k, d = w.shape
    h_ref = torch.autograd.functional.hessian(
        lambda v: _nll_sum(v, phi, b, labels, n_choices, k, d), w.reshape(-1)
    )
    h = full_ggn(phi, w, b, n_choices, chunk=3)  # chunking must not matter
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-12)
    lap = LastLayerLaplace(w, b, structure="full", prior_precision=1.0).fit(phi, labels, n_choices)
    torch.testing.assert_close(lap.hessian(), h_ref, rtol=1e-9, atol=1e-11)
    assert lap.log_likelihood == pytest.approx(
        -float(_nll_sum(w.reshape(-1), phi, b, labels, n_choices, k, d))
    )


def test_laplace_kron_factors_equal_definitions():
    phi, w, b, labels, n_choices = _laplace_problem(n=12)
    k, d = w.shape
    a_ref = torch.zeros(d, d, dtype=torch.float64)
    g_ref = torch.zeros(k, k, dtype=torch.float64)
    for i in range(phi.shape[0]):
        c = int(n_choices[i])
        p = torch.zeros(k, dtype=torch.float64)
        p[:c] = torch.softmax(w[:c] @ phi[i] + b[:c], dim=0)
        a_ref += torch.outer(phi[i], phi[i])
        g_ref += torch.diag(p) - torch.outer(p, p)
    a, g = kron_factors(phi, w, b, n_choices, chunk=5)
    torch.testing.assert_close(a, a_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    assert g[k - 1].abs().sum() > 0  # the padded class appears only where valid
    lap = LastLayerLaplace(w, b, structure="kron", prior_precision=1.0).fit(phi, labels, n_choices)
    torch.testing.assert_close(lap.hessian(), torch.kron(g_ref, a_ref) / phi.shape[0], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("structure", ["full", "kron"])
def test_laplace_marginal_likelihood_and_prior_choice(structure):
    phi, w, b, labels, n_choices = _laplace_problem(n=40, seed=1)
    k, d = w.shape
    lap = LastLayerLaplace(w, b, structure=structure).fit(phi, labels, n_choices)
    h = (
        full_ggn(phi, w, b, n_choices)
        if structure == "full"
        else torch.kron(*kron_factors(phi, w, b, n_choices)[::-1]) / 40
    )
    log_lik = -float(_nll_sum(w.reshape(-1), phi, b, labels, n_choices, k, d))
    p = k * d

    def brute(lam: float) -> float:
        logdet = torch.logdet(h + lam * torch.eye(p, dtype=torch.float64))
        return log_lik - 0.5 * lam * float(w.square().sum()) + 0.5 * p * math.log(lam) - 0.5 * float(logdet)

    for lam in (0.03, 1.0, 30.0):
        assert lap.log_marginal_likelihood(lam) == pytest.approx(brute(lam), rel=1e-10, abs=1e-9)
    best = lap.prior_precision
    assert 1e-10 < best < 1e10
    top = lap.log_marginal_likelihood(best)
    assert top == pytest.approx(brute(best), rel=1e-10)
    for f in (1.01, 1.3, 10.0):
        assert top > brute(best * f) and top > brute(best / f)
    grid = torch.logspace(-4, 4, 81).tolist()
    assert top >= max(brute(lam) for lam in grid)


@pytest.mark.parametrize("structure", ["full", "kron"])
def test_laplace_logit_covariance_matches_brute_force(structure):
    phi, w, b, labels, n_choices = _laplace_problem(n=30, seed=2)
    k, d = w.shape
    lap = LastLayerLaplace(w, b, structure=structure, prior_precision=0.7).fit(phi, labels, n_choices)
    h = (
        full_ggn(phi, w, b, n_choices)
        if structure == "full"
        else torch.kron(*kron_factors(phi, w, b, n_choices)[::-1]) / 30
    )
    sigma = torch.linalg.inv(h + 0.7 * torch.eye(k * d, dtype=torch.float64))
    x = torch.randn(5, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mu, cov = lap.logit_mean_and_covariance(x)
    for i in range(5):
        jac = torch.kron(torch.eye(k, dtype=torch.float64), x[i : i + 1])  # (K, K d), row-major vec(W)
        torch.testing.assert_close(cov[i], jac @ sigma @ jac.T, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(mu, x @ w.T + b)
    # The generalized probit formula, with the padded class at exactly 0.
    nc = torch.tensor([3, 2, 3, 2, 3])
    probs = lap.predict_proba(x, nc)
    var = cov.diagonal(dim1=-2, dim2=-1)
    ref = torch.softmax(masked_logits(mu / torch.sqrt(1 + math.pi / 8 * var), nc), dim=-1)
    torch.testing.assert_close(probs, ref.float(), rtol=0, atol=1e-6)
    assert (probs[nc == 2, 2] == 0).all()


@pytest.mark.parametrize("structure", ["full", "kron"])
@pytest.mark.parametrize("predictive", ["probit", "mc"])
def test_laplace_huge_prior_precision_gives_map_softmax(structure, predictive):
    phi, w, b, labels, n_choices = _laplace_problem(n=20, seed=4)
    lap = LastLayerLaplace(
        w, b, structure=structure, predictive=predictive, prior_precision=1e12, n_samples=200
    )
    lap.fit(phi, labels, n_choices)
    probs = lap.predict_proba(phi, n_choices)
    ref = torch.softmax(masked_logits(phi @ w.T + b, n_choices), dim=-1).float()
    torch.testing.assert_close(probs, ref, rtol=0, atol=1e-5)
    # With a broad posterior the predictive is less confident than the MAP softmax.
    lap.prior_precision = 1e-2
    broad = lap.predict_proba(phi, n_choices)
    assert broad.max(dim=-1).values.mean() < ref.max(dim=-1).values.mean() - 0.01
    torch.testing.assert_close(broad.sum(-1), torch.ones(20), rtol=0, atol=1e-5)


@pytest.mark.parametrize("structure", ["full", "kron"])
def test_laplace_variance_shrinks_with_more_data(structure):
    phi, w, b, labels, n_choices = _laplace_problem(n=400, seed=5)
    x = torch.randn(20, w.shape[1], generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    traces = []
    for n in (10, 40, 400):
        lap = LastLayerLaplace(w, b, structure=structure, prior_precision=1.0)
        lap.fit(phi[:n], labels[:n], n_choices[:n])
        traces.append(float(lap.logit_mean_and_covariance(x)[1].diagonal(dim1=-2, dim2=-1).sum()))
    assert traces[0] > traces[1] > traces[2]


def test_laplace_mc_predictive_is_seeded_and_matches_sampling():
    phi, w, b, labels, n_choices = _laplace_problem(n=30, seed=7)
    lap = LastLayerLaplace(w, b, predictive="mc", prior_precision=0.5, n_samples=20000, seed=1).fit(
        phi, labels, n_choices
    )
    x, nc = phi[:4], n_choices[:4]
    p1, p2 = lap.predict_proba(x, nc), lap.predict_proba(x, nc)
    assert torch.equal(p1, p2)
    mu, cov = lap.logit_mean_and_covariance(x)
    g = torch.Generator().manual_seed(123)  # independent draws via Cholesky, another generator
    for i in range(4):
        chol = torch.linalg.cholesky(cov[i] + 1e-12 * torch.eye(3, dtype=torch.float64))
        s = mu[i] + torch.randn(20000, 3, generator=g, dtype=torch.float64) @ chol.T
        s[:, int(nc[i]) :] = float("-inf")
        torch.testing.assert_close(p1[i].double(), torch.softmax(s, -1).mean(0), rtol=0, atol=0.015)


def test_laplace_on_tiny_model_features_via_evaluate():
    """End to end on the tiny model: features of a split, a Laplace head, evaluate.predict on top."""
    adapter = _lora(layers=[-1])
    source = FeatureSource(adapter.base_model, pad_id=0, cache_prefix=True)
    enc = _split(n=9)
    phi, labels, n_choices = split_features(source, enc, batch_size=4)
    with torch.no_grad():
        torch.testing.assert_close(phi[[2, 7]], source.features(enc, [2, 7]))
    head = _head(k=4)
    lap = LastLayerLaplace.from_head(head, structure="kron").fit(phi, labels, n_choices)
    preds = predict(source, lap, enc, batch_size=4, progress=False)
    assert preds.probs.shape == (9, 4)
    torch.testing.assert_close(preds.probs.sum(-1), torch.ones(9), rtol=0, atol=1e-5)
    assert (preds.probs[n_choices == 3, 3] == 0).all()


# ============================================================================================ MC dropout
def _count_calls(module) -> list[int]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    module.register_forward_hook(hook)
    return calls


def test_mc_dropout_without_dropout_is_the_deterministic_prediction():
    adapter = _lora(layers=[-1], dropout=0.0)
    _randomize(adapter)
    source = FeatureSource(adapter.base_model, pad_id=0, cache_prefix=True)
    enc, head = _split(), _head()
    source.prepare(enc, 4, progress=False)
    det = predict(source, head, enc, 4, progress=False)
    with pytest.warns(UserWarning, match="no adapter dropout"):
        one = predict_mc_dropout(source, head, enc, batch_size=4, n_samples=1, seed=0, progress=False)
    torch.testing.assert_close(one.probs, det.probs, rtol=0, atol=0)  # every sample is the deterministic pass
    with pytest.warns(UserWarning):
        preds = predict_mc_dropout(source, head, enc, batch_size=4, n_samples=3, seed=0, progress=False)
    torch.testing.assert_close(preds.probs, det.probs, rtol=0, atol=1e-6)


def test_mc_dropout_samples_differ_count_passes_and_are_seeded():
    adapter = _lora(layers=[-1], dropout=0.3)
    _randomize(adapter, scale=0.5)
    source = FeatureSource(adapter.base_model, pad_id=0, cache_prefix=True)
    enc, head = _split(n=7), _head()
    source.prepare(enc, 4, progress=False)
    blocks = adapter.base_model.model.layers
    frozen_calls, adapted_calls = _count_calls(blocks[0]), _count_calls(blocks[1])

    state = torch.get_rng_state()
    p1 = predict_mc_dropout(source, head, enc, batch_size=4, n_samples=5, seed=11, progress=False)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    n_batches = math.ceil(7 / 4)
    assert adapted_calls[0] == 5 * n_batches
    assert frozen_calls[0] == 0  # the frozen prefix came from the cache
    p2 = predict_mc_dropout(source, head, enc, batch_size=4, n_samples=5, seed=11, progress=False)
    p3 = predict_mc_dropout(source, head, enc, batch_size=4, n_samples=5, seed=12, progress=False)
    assert torch.equal(p1.probs, p2.probs)
    assert not torch.allclose(p1.probs, p3.probs, atol=1e-4)
    assert isinstance(p1, Predictions) and torch.equal(p1.labels, enc.labels)
    torch.testing.assert_close(p1.probs.sum(-1), torch.ones(7), rtol=0, atol=1e-5)
    # Dropout modules are back in eval mode afterwards.
    assert all(not m.lora_dropout["default"].training for _, m in adapter.lora_layers())

    # single samples with different masks differ
    s0 = predict_mc_dropout(source, head, enc, batch_size=4, n_samples=1, seed=0, progress=False)
    s1 = predict_mc_dropout(source, head, enc, batch_size=4, n_samples=1, seed=1, progress=False)
    assert (s0.probs - s1.probs).abs().max() > 1e-3
    det = predict(source, head, enc, 4, progress=False)  # dropout off again: deterministic
    torch.testing.assert_close(det.probs, predict(source, head, enc, 4, progress=False).probs, rtol=0, atol=0)


def test_set_adapter_dropout_switches_only_adapter_dropout():
    polar = inject_polar(make_tiny_llama(), PolarConfig(r=4, target_modules=["q_proj"], dropout=0.2))
    polar.eval()
    assert set_adapter_dropout(polar, True) == 2
    drops = [m.polar_dropout for _, m in polar.polar_layers()]
    assert all(d.training for d in drops)
    others = [m for m in polar.base_model.modules() if m.training and all(m is not d for d in drops)]
    assert others == []
    assert set_adapter_dropout(polar, False) == 2
    assert not any(d.training for d in drops)
    adapter = _lora(dropout=0.0)
    assert set_adapter_dropout(adapter, True) == 0


# ============================================================================================== ensembles
def test_ensemble_averages_probabilities():
    labels = torch.tensor([0, 2])
    a = Predictions("test", torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]), labels)
    b = Predictions("test", torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.0, 1.0]]), labels.clone())
    c = Predictions("test", torch.tensor([[0.1, 0.9, 0.0], [0.4, 0.3, 0.3]]), labels.clone())
    out = ensemble_predictions([a, b, c])
    torch.testing.assert_close(out.probs, torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.2, 0.6]]))
    assert out.split == "test" and torch.equal(out.labels, labels)


def test_ensemble_refuses_mismatched_members():
    a = Predictions("test", torch.full((2, 3), 1 / 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        ensemble_predictions([a, Predictions("test", torch.full((2, 3), 1 / 3), torch.tensor([0, 2]))])
    with pytest.raises(ValueError, match="split"):
        ensemble_predictions([a, Predictions("val", torch.full((2, 3), 1 / 3), torch.tensor([0, 1]))])
    with pytest.raises(ValueError, match="shape"):
        ensemble_predictions([a, Predictions("test", torch.full((2, 4), 1 / 4), torch.tensor([0, 1]))])
    with pytest.raises(ValueError, match="no members"):
        ensemble_predictions([])


def test_predict_ensemble_swaps_member_adapters():
    adapter = _lora(layers=[-1])
    source = FeatureSource(adapter.base_model, pad_id=0, cache_prefix=True)
    enc, head = _split(), _head()
    members = []
    for seed in (1, 2):
        _randomize(adapter, seed=seed)
        members.append((adapter.adapter_state_dict(), head))
    _randomize(adapter, seed=99)
    own = adapter.adapter_state_dict()
    singles = []
    for state, h in members:
        adapter.load_adapter_state_dict(state)
        singles.append(predict(source, h, enc, 3, progress=False))
    adapter.load_adapter_state_dict(own)
    out = predict_ensemble(adapter, source, enc, 3, members, progress=False)
    torch.testing.assert_close(out.probs, ensemble_predictions(singles).probs, rtol=0, atol=0)
    assert not torch.allclose(singles[0].probs, singles[1].probs)
    for k, v in adapter.adapter_state_dict().items():
        assert torch.equal(v, own[k])
