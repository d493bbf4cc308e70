"""Warm starts (polar_vbll.training.warm_start) and paused segments (``Trainer.fit(stop_at=...)``), what
``polar-vbll tune --scheduler pbt`` builds on: a segment paused and resumed equals the straight run
bitwise; a warm start with new hyperparameters equals switching the live optimizers' settings mid-run by
hand; what a warm start cannot change is refused naming the key."""

from __future__ import annotations

import pytest
import torch

from polar_vbll.adapters import inject_polar
from polar_vbll.checkpoint import list_checkpoints, load_checkpoint
from polar_vbll.config import parse_config
from polar_vbll.errors import CheckpointError
from polar_vbll.features import FeatureSource
from polar_vbll.heads import DeterministicHead
from polar_vbll.training import Trainer
from polar_vbll.training.warm_start import check_warm_start, warm_startable, with_settings

from .conftest import make_tiny_llama
from .test_train import K, _adapter_snapshot, _split

A = {"lr_stiefel": 0.05, "lr_theta": 0.05, "warmup_ratio": 0.2}
B = {
    "lr_stiefel": 0.02,
    "lr_theta": 0.01,
    "warmup_ratio": 0.2,
    "theta_weight_decay": 0.1,
    "betas": [0.8, 0.99],
}


def _trainer(run_dir, optim: dict, r: int = 4, steps: int = 6) -> Trainer:
    cfg = parse_config(
        {
            "name": "t",
            "output_dir": str(run_dir),
            "polar": {"r": r, "alpha": 8, "layers": [-1]},
            "optim": optim,
            "train": {"steps": steps, "batch_size": 5, "checkpoint_every": 100},
        }
    )
    model = make_tiny_llama(seed=0)
    polar = inject_polar(model, cfg.polar)
    head = DeterministicHead(model.lm_head.weight[3 : 3 + K])
    source = FeatureSource(polar.base_model, pad_id=0, cache_prefix=True)
    return Trainer.local(cfg, polar, head, _split(), run_dir / "t", source=source, progress=False)


def _assert_same_adapters(a: Trainer, b: Trainer, exact: bool = True) -> None:
    x, y = _adapter_snapshot(a.adapter), _adapter_snapshot(b.adapter)
    for name in x:
        if exact:
            assert torch.equal(x[name], y[name]), name
        else:
            torch.testing.assert_close(x[name], y[name], rtol=1e-6, atol=1e-7)


def test_a_paused_segment_resumes_to_the_straight_run_bitwise(tmp_path):
    straight = _trainer(tmp_path / "straight", A)
    straight.fit()
    first = _trainer(tmp_path / "paused", A)
    first.fit(stop_at=3)
    assert first.state.step == 3 and not first.finished
    assert [p.name for p in list_checkpoints(tmp_path / "paused" / "t")] == ["checkpoint-3"]
    torch.manual_seed(123)  # a new process would not share the RNG state
    second = _trainer(tmp_path / "paused", A)
    assert second.resume_latest() and second.state.step == 3
    second.fit()
    assert second.finished and second.state.warm_starts == []
    _assert_same_adapters(straight, second)
    assert straight.state.history[-1]["loss"] == second.state.history[-1]["loss"]


def test_a_warm_start_equals_switching_the_live_optimizers_settings_mid_run(tmp_path):
    """Oracle: train 3 steps under A, then set every live optimizer's settings to B's by hand (those of
    optimizers freshly built from B) and the trainer's config to B, train on. The warm start goes through
    a checkpoint on disk and a new trainer built from B."""
    ref = _trainer(tmp_path / "ref", A)
    ref.fit(stop_at=3)
    fresh = _trainer(tmp_path / "fresh", B)
    pairs = [(ref.stiefel_opt, fresh.stiefel_opt), (ref.backend.theta_optimizer, fresh.backend.theta_optimizer),
             (ref.head_opt, fresh.head_opt)]  # the head here trains with the adapters (optim.betas)  # fmt: skip
    assert all(a is not None for a, _ in pairs)
    for live, new in pairs:
        for g, h in zip(live.param_groups, new.param_groups, strict=True):
            g.update({k: v for k, v in h.items() if k != "params"})
    ref.cfg = fresh.cfg
    ref.fit()

    donor = _trainer(tmp_path / "donor", A)
    donor.fit(stop_at=3)
    state = load_checkpoint(list_checkpoints(tmp_path / "donor" / "t")[-1])
    torch.manual_seed(7)
    warm = _trainer(tmp_path / "warm", B)
    warm.resume(state, warm=True)
    assert warm.state.step == 3 and warm.state.resumed_from == 3
    theta_group = warm.backend.theta_optimizer.param_groups[0]
    assert theta_group["weight_decay"] == 0.1 and tuple(theta_group["betas"]) == (0.8, 0.99)
    saved = state["theta_opt"]["state"]
    for i, s in warm.backend.theta_optimizer.state_dict()["state"].items():  # the moments are the donor's
        assert torch.equal(s["exp_avg"], saved[i]["exp_avg"]) and torch.equal(
            s["exp_avg_sq"], saved[i]["exp_avg_sq"]
        )
    changed = warm.state.warm_starts[0]["changed"]
    assert warm.state.warm_starts[0]["step"] == 3
    assert changed["optim.lr_theta"] == [0.05, 0.01] and changed["optim.theta_weight_decay"] == [0.0, 0.1]
    assert set(changed) == {"optim.lr_stiefel", "optim.lr_theta", "optim.theta_weight_decay", "optim.betas"}
    warm.fit()
    _assert_same_adapters(ref, warm)
    assert ref.state.history[-1]["loss"] == warm.state.history[-1]["loss"]
    # the record survives the final checkpoint and an exact resume of it
    final = load_checkpoint(list_checkpoints(tmp_path / "warm" / "t")[-1])
    again = _trainer(tmp_path / "again", B)
    again.resume(final)
    assert again.state.warm_starts == warm.state.warm_starts


def test_a_warm_start_cannot_change_what_the_checkpoint_holds(tmp_path):
    donor = _trainer(tmp_path / "donor", A)
    donor.fit(stop_at=2)
    state = load_checkpoint(list_checkpoints(tmp_path / "donor" / "t")[-1])
    other = _trainer(tmp_path / "other", B, r=2)
    with pytest.raises(CheckpointError, match=r"polar\.r \(4 -> 2\)") as err:
        other.resume(state, warm=True)
    assert "lr_theta" not in str(err.value)  # the changed learning rates are allowed, not named
    with pytest.raises(CheckpointError, match="train.steps"):
        check_warm_start(state["config"], _trainer(tmp_path / "longer", A, steps=8).cfg)
    # an exact resume still refuses the changed learning rate
    with pytest.raises(CheckpointError, match="optimizer"):
        _trainer(tmp_path / "exact", B).resume(state)


def test_which_settings_a_warm_start_may_change():
    assert (
        warm_startable("optim.lr_theta") and warm_startable("lora.dropout") and warm_startable("head.fit.lr")
    )
    for key in ("polar.r", "method.head", "train.steps", "train.seed", "optim.method", "head.vbll.cov",
                "optim.second_moment", "head.fit.optimizer"):  # fmt: skip
        assert not warm_startable(key), key


def test_with_settings_keeps_the_moments_and_takes_the_new_settings():
    p = torch.nn.Parameter(torch.ones(3))
    old = torch.optim.AdamW([p], lr=0.1, betas=(0.9, 0.999), weight_decay=0.0)
    p.grad = torch.ones(3)
    old.step()
    new = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.5, betas=(0.5, 0.9), weight_decay=0.2)
    merged = with_settings(old.state_dict(), new.state_dict())
    assert (
        merged["state"] is old.state_dict()["state"]
        or merged["state"].keys() == old.state_dict()["state"].keys()
    )
    g = merged["param_groups"][0]
    assert (g["lr"], g["betas"], g["weight_decay"], g["params"]) == (0.5, (0.5, 0.9), 0.2, [0])
    with pytest.raises(CheckpointError, match="parameter groups"):
        with_settings(old.state_dict(), {"param_groups": []})


def test_the_head_coordinator_keeps_its_own_settings_on_a_warm_start():
    """The eta-phase's Adam (head.fit.lr, betas): moments from the checkpoint, settings from the config
    on a warm start; both from the checkpoint on an exact resume."""
    from polar_vbll.config import HeadFitConfig
    from polar_vbll.training.coordinator import HeadCoordinator

    torch.manual_seed(0)
    donor = HeadCoordinator(torch.nn.Linear(3, 2), HeadFitConfig(lr=0.1))
    donor.head(torch.randn(4, 3)).sum().backward()
    donor.optimizer.step()
    sd = donor.state_dict()
    new = HeadFitConfig(lr=0.5, betas=(0.5, 0.9))
    warm = HeadCoordinator(torch.nn.Linear(3, 2), new)
    warm.load_state_dict(sd, keep_settings=True)
    group = warm.optimizer.param_groups[0]
    assert group["lr"] == 0.5 and tuple(group["betas"]) == (0.5, 0.9)
    for i, s in warm.optimizer.state_dict()["state"].items():
        assert torch.equal(s["exp_avg"], sd["optimizer"]["state"][i]["exp_avg"])
    exact = HeadCoordinator(torch.nn.Linear(3, 2), new)
    exact.load_state_dict(sd)
    assert exact.optimizer.param_groups[0]["lr"] == 0.1
    assert torch.equal(warm.head.weight, donor.head.weight)
