"""TFB (training-free Bayesianization, Shi et al. 2025): the bisection on functions with a known answer, the
SVD basis and the posterior it defines, and a ``tfb`` run whose reload reuses the std the run found."""

from __future__ import annotations

import pytest
import torch

from polar_vbll.adapters import LoraAdapter, LoraConfig
from polar_vbll.adapters.dropout import adapter_dropout
from polar_vbll.tfb import bisect, set_std_scale, singular_bases

from .conftest import make_tiny_llama

pytest.importorskip("peft")

IDS = torch.tensor([[5, 17, 33, 9, 71, 4], [8, 8, 101, 55, 2, 19]])


def test_bisection_finds_the_threshold_crossing_of_a_known_function():
    # change(s) = s^2 crosses 0.01 at s = 0.1; the result is the last step above it, within the final bracket
    best, steps = bisect(lambda s: s * s, 0.0, 1.0, 0.01, 20)
    assert len(steps) == 20 and 0.1 <= best <= 0.1 + 2**-19
    assert all((st["change"] > 0.01) == (st["std_scale"] > 0.1) for st in steps)
    # first step is the midpoint; the bracket halves each step
    assert steps[0] == {"std_scale": 0.5, "change": 0.25} and steps[1]["std_scale"] == 0.25
    # nothing crosses: the upper bound; everything crosses: the lowest midpoint tried
    assert bisect(lambda s: 0.0, 0.001, 0.015, 0.003, 5)[0] == 0.015
    assert bisect(lambda s: 1.0, 0.0, 1.0, 0.003, 5)[0] == pytest.approx(1 / 32)


def _lora() -> LoraAdapter:
    adapter = LoraAdapter(make_tiny_llama(seed=0), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                                                             layers=[-1]))  # fmt: skip
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in adapter.theta_parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return adapter


def test_the_svd_basis_and_the_posterior_it_defines():
    adapter = _lora()
    with torch.no_grad():
        before = adapter(input_ids=IDS).logits
    bases = singular_bases(adapter)
    for name, layer in adapter.lora_layers():
        d, v = bases[name]
        b = layer.lora_B["default"].weight.detach()
        torch.testing.assert_close(v.T @ v, torch.eye(4), atol=1e-5, rtol=0)
        bv = b @ v  # = U diag(d): orthogonal columns of norms d, in decreasing order
        torch.testing.assert_close(bv.T @ bv, torch.diag(d**2), atol=1e-5, rtol=1e-4)
        assert torch.all(d[:-1] >= d[1:])
    set_std_scale(adapter, bases, 0.05)
    with torch.no_grad():
        torch.testing.assert_close(adapter(input_ids=IDS).logits, before, rtol=0, atol=0)  # not sampling: the mean
        for name, layer in adapter.lora_layers():
            d, _ = bases[name]
            torch.testing.assert_close(layer.blob_posterior.sigma()[:, 0], 0.05 / (d + 1e-6))
            assert torch.all(layer.blob_posterior.sigma() == layer.blob_posterior.sigma()[:, :1])  # one std a row
        with adapter_dropout(adapter, True):
            sampled = adapter(input_ids=IDS).logits
        assert not torch.equal(sampled, before)
        # the weights were not rewritten: the saved adapter stays the trained one
        set_std_scale(adapter, bases, 0.0)
        with adapter_dropout(adapter, True):
            torch.testing.assert_close(adapter(input_ids=IDS).logits, before, rtol=0, atol=0)
    # the same scale in the reference's rewritten factors gives the same per-output noise variance:
    # Var = s^2 sum_k (B V)_jk^2 sigma_k^2 ||x||^2 for a row-constant sigma
    name, layer = adapter.lora_layers()[0]
    set_std_scale(adapter, bases, 0.5)
    post = layer.blob_posterior
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    b = layer.lora_B["default"].weight.detach()
    torch.manual_seed(0)
    with torch.no_grad():
        draws = torch.stack([post(x, b, layer.scaling["default"])[0] for _ in range(4000)])
    d, v = bases[name]
    sigma = 0.5 / (d + 1e-6)
    want = layer.scaling["default"] ** 2 * ((b @ v) ** 2 @ sigma**2) * float((x**2).sum())
    torch.testing.assert_close(draws.var(0), want, rtol=0.12, atol=0)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_a_tfb_run_records_its_search_and_a_reload_reuses_it(tmp_path):
    from polar_vbll.config import load_config, resolve_config
    from polar_vbll.predictor import Predictor
    from polar_vbll.runner import run_training
    from polar_vbll.saved import evaluate_saved_run
    from polar_vbll.session import load_examples

    cfg = load_config(resolve_config("tiny", "run"), [
        f"output_dir={tmp_path}", "method=tfb", "train.steps=3", "tfb.iterations=3", "tfb.search_samples=2",
        "tfb.eval_samples=2", "tfb.max_std=4.0", "tfb.threshold=1e-4", "tfb.criterion=relative"])  # fmt: skip
    results = run_training(cfg, resume=False, progress=False, track=False)
    report = results["metrics"]["posterior"]
    assert report["method"] == "tfb" and len(report["steps"]) == 3
    assert report["anchor_size"] == results["split_sizes"]["train"]
    mids = [s["std_scale"] for s in report["steps"]]
    assert mids[0] == pytest.approx((0.001 + 4.0) / 2)
    assert cfg.tfb.min_std <= report["std_scale"] <= cfg.tfb.max_std
    assert results["passes_per_example"] == 2 and results["metrics"]["eval"]["epistemic"] > 0
    # a reload reuses the std the run found: `eval` and the predictor give the run's own numbers
    run = tmp_path / cfg.name
    again = evaluate_saved_run(run, progress=False)["metrics"]
    assert again["eval"] == results["metrics"]["eval"] and again["posterior"] == report
    preds, _ = Predictor.from_run(run, need_rule=False).predictive(load_examples(cfg)["eval"])
    m = preds.metrics()
    assert m["acc"] == results["metrics"]["eval"]["acc"]
    assert m["nll"] == pytest.approx(results["metrics"]["eval"]["nll"], rel=1e-6)
