"""Checkpoint files (content hash, atomic writes, nested optimizer state) and config validation."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from polar_vbll.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from polar_vbll.config import load_config, parse_config
from polar_vbll.errors import CheckpointError, ConfigError


def _optimizer_state() -> dict:
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = torch.optim.AdamW([p], lr=1e-2)
    p.grad = torch.randn(3, 4)
    opt.step()
    return opt.state_dict()


def test_round_trip_nested_state(tmp_path):
    state = {
        "step": 7,
        "opt": _optimizer_state(),
        "pair": (1, 2.5),
        "names": ["a", "b"],
        "t": torch.arange(5),
    }
    save_checkpoint(tmp_path / "checkpoint-7", state)
    back = load_checkpoint(tmp_path / "checkpoint-7")
    assert back["step"] == 7 and back["pair"] == (1, 2.5) and back["names"] == ["a", "b"]
    torch.testing.assert_close(back["t"], state["t"])
    # integer keys of optimizer state survive (they are param ids)
    assert set(back["opt"]["state"].keys()) == set(state["opt"]["state"].keys())
    torch.testing.assert_close(back["opt"]["state"][0]["exp_avg"], state["opt"]["state"][0]["exp_avg"])
    assert back["opt"]["param_groups"][0]["betas"] == state["opt"]["param_groups"][0]["betas"]


def test_altered_checkpoint_is_detected(tmp_path):
    d = save_checkpoint(tmp_path / "checkpoint-1", {"w": torch.ones(100)})
    f = d / "state.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or altered"):
        load_checkpoint(d)


def test_truncated_checkpoint_is_detected(tmp_path):
    d = save_checkpoint(tmp_path / "checkpoint-1", {"w": torch.ones(100)})
    f = d / "state.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="state.safetensors"):
        load_checkpoint(d)


def test_missing_checkpoint_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "checkpoint-9")


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    d = save_checkpoint(tmp_path / "checkpoint-1", {"w": torch.ones(3)})

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("polar_vbll.checkpoint.save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "checkpoint-1", {"w": torch.zeros(3)})
    torch.testing.assert_close(load_checkpoint(d)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]  # no temp debris


def test_list_and_prune(tmp_path):
    for s in (2, 10, 5):
        save_checkpoint(tmp_path / f"checkpoint-{s}", {"s": s})
    (tmp_path / "checkpoint-99.tmp-x").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-5", "checkpoint-10"]
    prune_checkpoints(tmp_path, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-10"]


def test_rng_state_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    save_checkpoint(tmp_path / "c", {"rng": rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(tmp_path / "c")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_config_unknown_key_is_named(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "bad.yaml" in str(e.value) and "train.stepz" in str(e.value) and "unknown key" in str(e.value)


def test_config_wrong_type_is_named(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  steps: many\npolar:\n  r: 0\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "train.steps" in str(e.value) and "polar.r" in str(e.value)


def test_keys_of_the_old_layout_say_what_replaced_them(tmp_path):
    p = tmp_path / "old.yaml"
    p.write_text("adapter_kind: lora\nadapter:\n  r: 4\nhead:\n  kind: vbll\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "adapter_kind: unknown key" in msg and "use `method`" in msg
    assert "adapter: unknown key" in msg and "renamed `polar`" in msg
    assert "head.kind: unknown key" in msg


def test_config_overrides_and_missing_file(tmp_path):
    cfg = load_config(None, ["train.steps=3", "polar.layers=[-1]", "optim.method=landing"])
    assert cfg.train.steps == 3 and cfg.polar.layers == [-1] and cfg.optim.method == "landing"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.steps"])


def test_non_finite_learning_rate_refused():
    with pytest.raises(ConfigError, match="optim.lr_stiefel"):
        parse_config({"optim": {"lr_stiefel": float("inf")}})


def test_flat_params_record_choices():
    params = parse_config({}).flat_params()
    for key in (
        "optim.method",
        "optim.retraction",
        "train.cache_frozen_prefix",
        "polar.r",
        "method",
        "model.add_bos",
    ):
        assert key in params


@pytest.mark.parametrize("kind", ["run", "compare"])
def test_every_packaged_config_loads(kind):
    """A packaged config is a documented starting point: every one must pass the same checks a user's does."""
    from polar_vbll.compare.config import load_compare_config
    from polar_vbll.config import packaged_config, packaged_names

    names = packaged_names(kind)
    assert names
    for name in names:
        path = packaged_config(kind, name)
        if kind == "run":
            load_config(path)
            continue
        try:
            load_compare_config(path)
        except ConfigError as exc:  # a profile for the user's own model (paper) names what to set, and loads with it
            assert "model.path is not set" in str(exc) and "--set base.model.path=" in str(exc), (name, exc)
            load_compare_config(path, ["base.model.path=/models/Llama-3.1-8B"])
