"""Settings a method does not use are recorded as unused and noted once, by one rule driven by the method
registry (issue #21, item 2: ``eval.ensemble_members`` under a one-model method, ``optim.method=landing``
under LoRA, ``polar.*`` under a LoRA method were recorded as if they mattered)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from polar_vbll.config import RunConfig, load_config, resolve_config
from polar_vbll.methods import METHODS
from polar_vbll.provenance import training_settings
from polar_vbll.support import config_fields, unused_settings, used_by
from polar_vbll_cli.app import app

runner = CliRunner()


def test_a_run_notes_and_records_the_settings_its_method_does_not_use(tmp_path):
    result = runner.invoke(app, ["train", "--config", "tiny", "--no-progress", "--no-track", "--set",
                                 f"output_dir={tmp_path}", "--set", "method=lora_mle", "--set",
                                 "eval.ensemble_members=3", "--set", "optim.method=landing"])  # fmt: skip
    assert result.exit_code == 0, result.output
    notes = [ln for ln in result.output.splitlines() if "does not use" in ln]
    assert len(notes) == 1 and "eval.ensemble_members=3" in notes[0] and "optim.method='landing'" in notes[0]
    results = json.loads((tmp_path / "tiny" / "results.json").read_text())
    unused = results["unused_settings"]
    assert unused["eval.ensemble_members"] == 3 and unused["optim.method"] == "landing"
    assert unused["polar.r"] == 4  # the tiny config's PoLAR section, under a LoRA method
    assert "lora.r" not in unused and "train.steps" not in unused
    params = json.loads((tmp_path / "tiny" / "params.json").read_text())
    assert params["unused_settings"] == sorted(unused)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_setting_that_changes_what_is_trained_counts_as_used(method):
    """The registry's two views agree: what decides a trained model (provenance.training_settings) is read."""
    cfg = RunConfig(method=method)
    for key in training_settings(cfg):
        if key.startswith("method."):
            continue
        assert used_by(method, key), (method, key)


def test_the_rule_on_the_reported_cases():
    assert not used_by("polar_mle", "eval.ensemble_members") and used_by("ensemble", "eval.ensemble_members")
    assert not used_by("lora_mle", "optim.method") and used_by("polar_vbll", "optim.method")
    assert not used_by("lora_mle", "polar.r") and not used_by("polar_mle", "lora.r")
    assert not used_by("polar_mle", "head.vbll.prior_scale") and used_by("polar_vbll", "head.vbll.prior_scale")
    assert used_by("polar_laplace", "head.laplace.structure") and not used_by("polar_vbll", "head.laplace.mean")
    assert not used_by("zero_shot", "train.steps") and not used_by("polar_mle", "train.round_steps")
    every = set(config_fields())
    assert all(used_by(m, f) for m in METHODS for f in every if f.startswith(("model.", "data.", "decision.")))
    cfg = load_config(resolve_config("tiny"))  # sets polar.*, lora.* and blob.* for every family of methods
    assert set(unused_settings(cfg)) == {"lora.r", "lora.alpha", "lora.layers", "blob.r", "blob.alpha", "blob.layers"}
    assert used_by("blob", "blob.eval_samples") and not used_by("blob", "lora.r") and not used_by("lora_mle", "blob.r")
    assert used_by("tfb", "tfb.threshold") and used_by("tfb", "lora.r") and not used_by("lora_mle", "tfb.threshold")
    assert used_by("mc_dropout", "eval.mc_dropout_samples") and not used_by("tfb", "eval.mc_dropout_samples")


@pytest.mark.extras("ray", "deepspeed")
def test_zero_workers_is_refused_in_one_line(tmp_path):
    result = runner.invoke(app, ["train", "--config", "tiny", "--workers", "0", "--no-track", "--set",
                                 f"output_dir={tmp_path}"])  # fmt: skip
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0] == "error: invalid distributed setting --workers: workers: Input should be greater than 0 (got 0)"
