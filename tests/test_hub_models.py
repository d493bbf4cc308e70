"""Models named by hub id, resolved offline from a Hugging Face cache the test lays out (``HF_HUB_CACHE`` in a
temporary folder, ``HF_HUB_OFFLINE=1``): nothing downloads. The run records the snapshot and its commit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from polar_vbll.config import ModelConfig
from polar_vbll.errors import ModelLoadError
from polar_vbll.models import resolve_model_path, tiny_model_dir
from polar_vbll_cli.app import app

runner = CliRunner()
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """A hub cache holding ``acme/tiny-llama`` at two commits (``main`` -> COMMIT, tag ``v1`` -> OLD), laid out
    as ``huggingface_hub`` writes it (``models--acme--tiny-llama/{refs,snapshots}``), files copied in."""
    import shutil

    from polar_vbll.models import bundled_tokenizer_dir

    model = tiny_model_dir(ModelConfig(source="tiny"))
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    for commit in (COMMIT, OLD):
        shutil.copytree(model, repo / "snapshots" / commit)
        for f in bundled_tokenizer_dir().iterdir():
            shutil.copy(f, repo / "snapshots" / commit / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "v1").write_text(OLD)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo


def test_a_hub_id_resolves_to_its_cached_snapshot(hub_cache):
    assert resolve_model_path(ModelConfig(source="path", path="acme/tiny-llama")) == hub_cache / "snapshots" / COMMIT
    old = ModelConfig(source="path", path="acme/tiny-llama", revision="v1")
    assert resolve_model_path(old) == hub_cache / "snapshots" / OLD
    by_commit = ModelConfig(source="path", path="acme/tiny-llama", revision=OLD)
    assert resolve_model_path(by_commit) == hub_cache / "snapshots" / OLD
    # the cache's own repository folder works as a path too
    assert resolve_model_path(ModelConfig(source="path", path=str(hub_cache))) == hub_cache / "snapshots" / COMMIT
    with pytest.raises(ModelLoadError, match="without revision 'v9'"):
        resolve_model_path(ModelConfig(source="path", path=str(hub_cache), revision="v9"))
    # a hub id stays an id in the config (a local path is made absolute)
    assert ModelConfig(source="path", path="acme/tiny-llama").path == "acme/tiny-llama"


def test_train_by_hub_id_offline_records_the_snapshot(hub_cache, tmp_path):
    result = runner.invoke(app, [
        "train", "--config", "tiny", "--no-progress", "--no-track", "--set", f"output_dir={tmp_path / 'runs'}",
        "--set", "model.source=path", "--set", "model.path=acme/tiny-llama", "--set", "train.steps=2",
        "--set", "data.train_limit=8", "--set", "data.val_limit=8", "--set", "data.eval_limit=8"])  # fmt: skip
    assert result.exit_code == 0, result.output
    params = json.loads((tmp_path / "runs" / "tiny" / "params.json").read_text())
    assert params["model.path"] == "acme/tiny-llama"
    assert params["model_source.revision"] == COMMIT
    assert params["model_source.path"] == str(hub_cache / "snapshots" / COMMIT)
    assert params["model_source.model_type"] == "llama"


def test_an_id_absent_from_the_cache_is_one_line(hub_cache, tmp_path):
    result = runner.invoke(app, [
        "train", "--config", "tiny", "--no-progress", "--no-track", "--set", f"output_dir={tmp_path / 'runs'}",
        "--set", "model.source=path", "--set", "model.path=acme/absent"])  # fmt: skip
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "acme/absent" in lines[0] and "HF_HUB_OFFLINE" in lines[0], result.output
    assert not (tmp_path / "runs").exists()
