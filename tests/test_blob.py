"""BLoB (Bayesian LoRA, Wang et al. 2024) as an adapter kind: its KL, KL weights, flipout sampling, the
second optimizer's step, save/load, and a run of the ``blob`` method end to end. References: hand-computed
values, the closed-form Gaussian KL and its hand-derived gradients, and the flipout perturbation's moments
derived on paper (``polar_vbll.adapters.blob``'s docstring gives the reference code's formulas)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from polar_vbll.adapters.blob import (
    KL_EPS,
    BlobAdapter,
    kl_divergence,
    kl_period,
    kl_weight,
)
from polar_vbll.adapters.config import BlobConfig
from polar_vbll.adapters.dropout import adapter_dropout
from polar_vbll.errors import CheckpointError, ConfigError

from .conftest import make_tiny_llama

peft = pytest.importorskip("peft")


def _blob(eps: float = 0.05, seed: int = 0, **kw) -> BlobAdapter:
    cfg = BlobConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"], layers=[-1], eps=eps, **kw)
    return BlobAdapter(make_tiny_llama(seed=seed), cfg)


def _randomize(adapter: BlobAdapter, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.theta_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[5, 17, 33, 9, 71, 4], [8, 8, 101, 55, 2, 19]])


# ------------------------------------------------------------------------------------------------ the KL
def test_kl_equals_hand_computed_values_and_the_closed_form():
    mean = torch.tensor([[0.1, -0.3], [0.0, 0.25]])
    sigma = torch.tensor([[0.01, 0.02], [0.05, 0.2]])
    beta = 0.2
    by_hand = 0.0
    for m, s in zip(mean.flatten().tolist(), sigma.flatten().tolist(), strict=True):
        by_hand += math.log(beta + 1e-6) - math.log(s + 1e-6) + (s * s + m * m) / (2 * beta * beta + 1e-6) - 0.5
    kl = kl_divergence(mean, sigma, beta)
    assert kl.dtype == torch.float64
    assert float(kl) == pytest.approx(by_hand, rel=1e-12)
    # The textbook KL(N(m, s^2) || N(0, b^2)) = log(b / s) + (s^2 + m^2) / (2 b^2) - 1/2, up to eps' = 1e-6.
    exact = sum(math.log(beta / s) + (s * s + m * m) / (2 * beta * beta) - 0.5
                for m, s in zip(mean.flatten().tolist(), sigma.flatten().tolist(), strict=True))  # fmt: skip
    assert float(kl) == pytest.approx(exact, rel=1e-3)
    # At the prior itself the KL is zero (up to eps').
    assert abs(float(kl_divergence(torch.zeros(3), torch.full((3,), beta), beta))) < 1e-4


def test_kl_weights_by_hand():
    # period 3: steps 0..3 are i = 1, 2, 3, 1 -> 2/15, 4/15, 8/15, 2/15
    assert [kl_weight(s, 3, True) for s in range(4)] == pytest.approx([2 / 15, 4 / 15, 8 / 15, 2 / 15], rel=1e-15)
    assert sum(kl_weight(s, 3, True) for s in range(3)) == pytest.approx(14 / 15)
    assert kl_weight(7, 4, False) == 0.25
    assert 0.0 <= kl_weight(0, 5000, True) < 1e-300 and kl_weight(4999, 5000, True) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        kl_weight(0, 0, True)
    # data-set rescaling: int(100 * 640^(pi/8) / 4) = int(100 * 12.6466 / 4) = 316; without: ceil(640 / 4)
    assert kl_period(BlobConfig(), 640, 4) == 316
    assert kl_period(BlobConfig(dataset_rescaling=False), 641, 4) == 161


# ----------------------------------------------------------------------------------------------- sampling
def test_sigma_parametrisations_and_init_ranges():
    pos, neg = _blob(eps=0.05), _blob(eps=-3.0)
    for _, post, _ in pos.posteriors():
        assert post.rho.min() >= 0.05 / math.sqrt(2) and post.rho.max() <= 0.05
        torch.testing.assert_close(post.sigma(), post.rho**2)
    for _, post, _ in neg.posteriors():
        assert post.rho.min() >= -4.0 and post.rho.max() <= -3.0
        torch.testing.assert_close(post.sigma(), torch.log1p(torch.exp(post.rho)))
    assert _blob().adapter_state_dict().keys() == _blob().adapter_state_dict().keys()
    a, b = _blob(seed=0).adapter_state_dict(), _blob(seed=0).adapter_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the init is seeded
    with pytest.raises(ValueError, match="non-zero"):
        BlobConfig(eps=0.0)


def test_sampling_off_is_the_mean_lora_and_on_has_the_flipout_moments(tmp_path):
    adapter = _blob()
    _randomize(adapter)
    # Off (eval, no noise switch): exactly peft's LoRA with A = M.
    plain = peft.PeftModel.from_pretrained(make_tiny_llama(seed=0), str(adapter.export_peft_lora(tmp_path / "peft")))
    torch.testing.assert_close(_logits(adapter, IDS), _logits(plain, IDS), rtol=0, atol=0)

    # On: one layer's perturbation has mean 0 and, per output j, variance s^2 sum_k B_jk^2 sum_i x_i^2 sigma_ki^2
    # (the signs square to 1, the draws are independent): checked against 4000 draws.
    name, layer = adapter.lora_layers()[0]
    post = layer.blob_posterior
    with torch.no_grad():
        post.rho.mul_(20.0)  # a large sigma, so the moments dominate float noise
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    b = layer.lora_B["default"].weight.detach()
    s = layer.scaling["default"]
    torch.manual_seed(0)
    with torch.no_grad():
        draws = torch.stack([post(x, b, s)[0] for _ in range(4000)])  # (4000, out)
        sigma = post.sigma()
    want_var = s**2 * (b**2) @ ((sigma**2) @ (x[0] ** 2))
    assert draws.mean(0).abs().max() < 4 * (want_var / 4000).sqrt().max()
    torch.testing.assert_close(draws.var(0), want_var, rtol=0.12, atol=0)
    # Through the model: the noise switch turns sampling on (passes differ) and off again.
    with adapter_dropout(adapter, True) as active:
        assert active == 2
        one, two = _logits(adapter, IDS), _logits(adapter, IDS)
    assert not torch.equal(one, two)
    torch.testing.assert_close(_logits(adapter, IDS), _logits(plain, IDS), rtol=0, atol=0)
    assert name.endswith("q_proj")


# ------------------------------------------------------------------------------------ the second optimizer
def test_variational_step_is_sgd_on_the_weighted_kl_gradients_by_hand():
    adapter = _blob()
    _randomize(adapter)
    cfg = adapter.lora_config
    posts = adapter.posteriors()
    data_grads = [torch.full_like(p.rho, 0.5) for _, p, _ in posts]  # what the step's backward left on rho
    for (_, p, _), g in zip(posts, data_grads, strict=True):
        p.rho.grad = g.clone()
    before = [(a.detach().clone(), p.rho.detach().clone()) for _, p, a in posts]
    n_train, batch = 100, 4
    step, lr_factor = 2, 0.5
    logs = adapter.variational_step(step, lr_factor, n_train, batch)

    period = int(100 * 100 ** (math.pi / 8) / 4)
    pi = 2 ** (step + 1) / (2 ** (period + 1) - 1)
    lr = cfg.kl_lr * lr_factor
    beta2 = 2 * cfg.beta**2 + KL_EPS
    kl = 0.0
    for (m, rho), (_, p, a), g in zip(before, posts, data_grads, strict=True):
        m64, rho64 = m.double(), rho.double()
        sigma = rho64**2
        # dKL/dM = 2M / (2 beta^2 + eps'); dKL/drho = (-1 / (sigma + eps') + 2 sigma / (2 beta^2 + eps')) 2 rho
        torch.testing.assert_close(a.detach().double(), m64 - lr * pi * 2 * m64 / beta2, rtol=1e-6, atol=1e-9)
        d_rho = (-1 / (sigma + KL_EPS) + 2 * sigma / beta2) * 2 * rho64
        torch.testing.assert_close(p.rho.detach().double(), rho64 - lr * (g.double() + pi * d_rho),
                                   rtol=1e-6, atol=1e-9)  # fmt: skip
        assert p.rho.grad is None
        kl += float(kl_divergence(m, sigma, cfg.beta))
    assert logs["kl_weight"] == pytest.approx(pi, rel=1e-12)
    assert logs["kl"] == pytest.approx(kl, rel=1e-9)
    # AdamW never sees rho: it is not a theta parameter.
    rho_ids = {id(r) for r in adapter.posterior_parameters()}
    assert not rho_ids & {id(p) for p in adapter.theta_parameters()}


# -------------------------------------------------------------------------------------------- save / load
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_save_load_round_trip_and_tampering(tmp_path):
    adapter = _blob()
    _randomize(adapter)
    with torch.no_grad():
        for r in adapter.posterior_parameters():
            r.add_(0.01)
    d = adapter.save_adapter(tmp_path / "adapter")
    assert {"blob_config.json", "blob_posterior.safetensors", "adapter_model.safetensors"} <= {
        p.name for p in d.iterdir()
    }
    loaded = BlobAdapter.load_adapter(make_tiny_llama(seed=0), d)
    want = adapter.adapter_state_dict()
    got = loaded.adapter_state_dict()
    assert got.keys() == want.keys() and any(k.endswith("blob_posterior.rho") for k in got)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert loaded.lora_config == adapter.lora_config
    # the posterior file altered, or the config's beta edited: refused
    post = d / "blob_posterior.safetensors"
    raw = post.read_bytes()
    post.write_bytes(raw[:-4] + b"\0\0\0\0")
    with pytest.raises(CheckpointError, match="truncated or altered"):
        BlobAdapter.load_adapter(make_tiny_llama(seed=0), d)
    post.write_bytes(raw)
    side = d / "blob_config.json"
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "lora_config": {**meta["lora_config"], "beta": 1.0}}))
    with pytest.raises(CheckpointError, match="altered after it was written"):
        BlobAdapter.load_adapter(make_tiny_llama(seed=0), d)
    # the PEFT export holds peft's files only (the mean), loadable by peft
    e = adapter.export_peft_lora(tmp_path / "peft")
    assert sorted(p.name for p in e.iterdir() if p.suffix in (".json", ".safetensors")) == [
        "adapter_config.json", "adapter_model.safetensors"]  # fmt: skip
    from safetensors.torch import load_file

    keys = set(load_file(str(e / "adapter_model.safetensors")))
    assert keys and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in keys), sorted(keys)[:3]


def test_a_bad_blob_setting_is_one_config_error():
    from polar_vbll.config import parse_config

    with pytest.raises(ConfigError, match="blob.beta"):
        parse_config({"method": "blob", "blob": {"beta": -1}})


# --------------------------------------------------------------------------------------------- end to end
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_the_blob_method_trains_logs_its_kl_and_predicts_with_its_passes(tmp_path):
    from polar_vbll.config import load_config, resolve_config
    from polar_vbll.runner import run_training

    cfg = load_config(resolve_config("tiny", "run"), [f"output_dir={tmp_path}", "method=blob", "train.steps=4",
                                                      "blob.eval_samples=3"])  # fmt: skip
    results = run_training(cfg, resume=False, progress=False, track=False)
    assert results["passes_per_example"] == 3
    history = results["training"]["history"]
    assert len(history) == 4 and all("kl" in h and "kl_weight" in h for h in history)
    period = kl_period(cfg.blob, results["split_sizes"]["train"], cfg.train.batch_size)
    assert [h["kl_weight"] for h in history] == pytest.approx([kl_weight(s, period, True) for s in range(4)])
    m = results["metrics"]["eval"]
    assert 0 <= m["acc"] <= 1 and m["epistemic"] > 0  # sampled passes disagree: mutual information > 0


def test_blob_on_workers_is_refused_above_zero_stage_0_before_anything_runs():
    pytest.importorskip("ray")
    from distributed.config import DistConfig, check_adapter_stage
    from polar_vbll.config import parse_config

    cfg = parse_config({"method": "blob"})
    for stage in (1, 2, 3):
        with pytest.raises(ConfigError, match=f"--zero-stage 0 only \\(got {stage}\\)"):
            check_adapter_stage(cfg, DistConfig(zero_stage=stage))
    check_adapter_stage(cfg, DistConfig(zero_stage=0))
    check_adapter_stage(parse_config({"method": "lora_mle"}), DistConfig(zero_stage=3))


# ------------------------------------------------------------------------------------------------ PoLAR-BLoB
def _polar_blob(seed: int = 0):
    from polar_vbll.adapters.blob import PolarBlobAdapter
    from polar_vbll.adapters.config import PolarBlobConfig

    cfg = PolarBlobConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"], layers=[-1])
    adapter = PolarBlobAdapter(make_tiny_llama(seed=seed), cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter.theta_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return adapter


def test_polar_blob_samples_theta_with_the_flipout_moments_and_its_mean_is_polar(tmp_path):
    from polar_vbll.adapters.blob import PolarBlobAdapter
    from polar_vbll.adapters.model import PolarModel

    adapter = _polar_blob()
    assert adapter.orthogonality_error() < 1e-5 and len(adapter.posterior_parameters()) == 2
    # the mean: the PoLAR model with the same U, Theta, V (loaded through PoLAR's own loader, rho dropped)
    d = adapter.save_adapter(tmp_path / "adapter")
    mean = _logits(adapter, IDS)
    loaded = PolarBlobAdapter.load_adapter(make_tiny_llama(seed=0), d)
    assert all(torch.equal(v, loaded.adapter_state_dict()[k]) for k, v in adapter.adapter_state_dict().items())
    torch.testing.assert_close(_logits(loaded, IDS), mean, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="adapter_type 'polar_blob'"):
        PolarModel.load_adapter(make_tiny_llama(seed=0), d)
    plain = peft.PeftModel.from_pretrained(make_tiny_llama(seed=0), str(adapter.export_peft_lora(tmp_path / "peft")))
    torch.testing.assert_close(_logits(plain, IDS), mean, rtol=1e-4, atol=1e-5)
    # sampling: per output j, Var = s^2 sum_k U_jk^2 sum_i (V^T x)_i^2 sigma_ki^2
    name, layer = next(iter(adapter.polar_layers()))
    post = layer.blob_posterior
    with torch.no_grad():
        post.rho.mul_(10.0)
        x = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
        hv = x @ layer.V
        torch.manual_seed(0)
        draws = torch.stack([post(hv, layer.U, layer.scaling)[0] for _ in range(4000)])
        want = layer.scaling**2 * (layer.U**2) @ ((post.sigma() ** 2) @ (hv[0] ** 2))
    torch.testing.assert_close(draws.var(0), want, rtol=0.12, atol=0)
    with adapter_dropout(adapter, True) as active:
        assert active == 2 and not torch.equal(_logits(adapter, IDS), _logits(adapter, IDS))
    torch.testing.assert_close(_logits(adapter, IDS), mean, rtol=0, atol=0)
    # the KL is over Theta's entries
    theta_kl = sum(float(kl_divergence(m.polar_theta, m.blob_posterior.sigma(), 0.2))
                   for _, m in adapter.polar_layers())  # fmt: skip
    assert float(adapter.kl_divergence()) == pytest.approx(theta_kl, rel=1e-12)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_the_polar_blob_method_trains_on_the_manifold_and_predicts_with_its_passes(tmp_path):
    from polar_vbll.config import load_config, resolve_config
    from polar_vbll.runner import run_training

    cfg = load_config(resolve_config("tiny", "run"), [
        f"output_dir={tmp_path}", "method=polar_blob", "train.steps=4", "polar_blob.eval_samples=3",
        "polar_blob.layers=[-1]", "polar_blob.r=4", "polar_blob.alpha=8"])  # fmt: skip
    results = run_training(cfg, resume=False, progress=False, track=False)
    assert results["passes_per_example"] == 3 and results["training"]["orthogonality_error"] < 1e-4
    history = results["training"]["history"]
    assert all(h["kl"] > 0 and "kl_weight" in h for h in history)
    assert results["metrics"]["eval"]["epistemic"] > 0
