"""PoLAR-VBLL training: the alternating schedules, the head coordinator, exact resume with the head's state,
and exactly one backbone pass per example at test time."""

from __future__ import annotations

import math

import pytest
import torch

from polar_vbll.adapters import inject_polar
from polar_vbll.config import parse_config
from polar_vbll.features import FeatureSource
from polar_vbll.heads import VBLLHead
from polar_vbll.predictives import predict
from polar_vbll.training import HeadCoordinator, Trainer, TrainingDiverged

from .conftest import make_tiny_llama
from .test_train import K, _split


def _vbll_setup(tmp_path, alternation="per_round", steps=6, round_steps=2, cache_prefix=True, **train):
    cfg = parse_config(
        {
            "name": "v",
            "output_dir": str(tmp_path),
            "method": "polar_vbll",
            "polar": {"r": 4, "alpha": 8, "layers": [-1]},
            "optim": {"lr_stiefel": 0.05, "lr_theta": 0.05, "warmup_ratio": 0.0},
            "train": {
                "steps": steps,
                "batch_size": 5,
                "cache_frozen_prefix": cache_prefix,
                "alternation": alternation,
                "round_steps": round_steps,
                **train,
            },
            "head": {"vbll": {"prior_mean": "init"}, "fit": {"lr": 0.05, "steps": 5}},
        }
    )
    model = make_tiny_llama(seed=0)
    polar = inject_polar(model, cfg.polar)
    split = _split()
    head = VBLLHead.from_weight(
        model.lm_head.weight[3 : 3 + K], dataset_size=len(split), config=cfg.head.vbll
    )
    source = FeatureSource(polar.base_model, pad_id=0, cache_prefix=cache_prefix)
    trainer = Trainer.local(cfg, polar, head, split, tmp_path / "v", source=source, progress=False)
    return trainer


def _head_snapshot(head) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def test_per_round_refits_at_round_starts_and_at_the_end(tmp_path):
    trainer = _vbll_setup(tmp_path, steps=5, round_steps=2)
    start = _head_snapshot(trainer.head)
    trainer.fit()
    # refits before steps 0, 2, 4 and once more on the final adapters
    assert trainer.coordinator.refits == math.ceil(5 / 2) + 1
    assert not torch.equal(start["vbll_mean"], trainer.head.vbll_mean)
    assert any(p.abs().max() > 0 for p in trainer.adapter.theta_parameters())


def test_per_step_refits_after_every_adapter_step(tmp_path):
    trainer = _vbll_setup(tmp_path, alternation="per_step", steps=4)
    trainer.fit()
    # one full eta-phase before the first step, then one head step after every adapter step
    assert trainer.coordinator.refits == 1 + 4
    assert [f["step"] for f in trainer.state.head_fits] == [0]


def test_theta_phase_does_not_move_the_head_and_eta_phase_not_the_adapters(tmp_path):
    trainer = _vbll_setup(tmp_path, steps=3, round_steps=100, final_head_refit=False)
    trainer.train_step()  # round start: one refit, then one adapter step
    head_after_first = _head_snapshot(trainer.head)
    trainer.train_step()  # an adapter step only
    for k, v in head_after_first.items():
        assert torch.equal(v, trainer.head.state_dict()[k]), k
    adapters = {k: v.clone() for k, v in trainer.adapter.adapter_state_dict().items()}
    trainer.refit_head()
    for k, v in adapters.items():
        assert torch.equal(v, trainer.adapter.adapter_state_dict()[k]), k


def test_eta_phase_lowers_the_negative_elbo_on_fixed_features(tmp_path):
    trainer = _vbll_setup(tmp_path)
    phi = trainer.training_features()
    y, c = trainer.train_split.labels, trainer.train_split.n_choices
    before = float(trainer.head.loss(phi, y, c).detach())
    head_state, refits = trainer.coordinator.refit(0, phi, y, c, steps=50)
    trainer.head.load_state_dict(head_state)
    assert refits == 1
    assert float(trainer.head.loss(phi, y, c).detach()) < before


def test_coordinator_state_round_trip():
    head = VBLLHead(8, 3, dataset_size=20)
    coord = HeadCoordinator(head, parse_config({}).head.fit)
    phi, y, c = torch.randn(20, 8), torch.randint(0, 3, (20,)), torch.full((20,), 3)
    coord.refit(phi, y, c, steps=3)
    sd = coord.state_dict()
    other = HeadCoordinator(
        VBLLHead(8, 3, dataset_size=20, config={"init_seed": 5}), parse_config({}).head.fit
    )
    other.load_state_dict(sd)
    a, b = coord.refit(phi, y, c, steps=2), other.refit(phi, y, c, steps=2)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_vbll_resume_is_exact(tmp_path):
    straight = _vbll_setup(tmp_path / "a", steps=6)
    straight.fit()

    first = _vbll_setup(tmp_path / "b", steps=6)
    for _ in range(3):
        first.train_step()
    first.save()
    second = _vbll_setup(tmp_path / "b", steps=6)
    assert second.resume_latest() and second.state.step == 3
    second.fit()
    for k, v in straight.adapter.adapter_state_dict().items():
        assert torch.equal(v, second.adapter.adapter_state_dict()[k]), k
    for k, v in straight.head.state_dict().items():
        assert torch.equal(v, second.head.state_dict()[k]), k


def test_non_finite_head_is_named(tmp_path):
    trainer = _vbll_setup(tmp_path, round_steps=100)
    trainer.train_step()
    with torch.no_grad():
        trainer.head.vbll_mean[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="head"):
        trainer.train_step()


@pytest.mark.parametrize("cache_prefix", [False, True])
def test_one_backbone_pass_per_example_at_test_time(tmp_path, cache_prefix):
    """Uncertainty from one forward: every decoder block sees each test example exactly once (on the cached
    path the frozen blocks once while caching, the adapted block once while predicting)."""
    trainer = _vbll_setup(tmp_path, cache_prefix=cache_prefix)
    seen = {}

    def count(name):
        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            seen[name] = seen.get(name, 0) + hidden.shape[0]

        return hook

    blocks = trainer.adapter.base_model.model.layers
    handles = [b.register_forward_hook(count(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        enc = _split(n=13, seed=4)
        preds = predict(trainer.backend, trainer.head, enc, batch_size=5, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert seen == {0: 13, 1: 13}
    assert preds.probs.shape == (13, K)
    torch.testing.assert_close(preds.probs.sum(-1), torch.ones(13))
