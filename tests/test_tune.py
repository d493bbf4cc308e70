"""Searches and tracking: search spaces, secret masking, the early checks, and a real 2-trial Ray Tune
search (tiny Llama, real ARC-Easy questions, 2 CPU workers per trial) whose MLflow store is then read back.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.optional import skip_module_unless

skip_module_unless("ray", "deepspeed", "mlflow")

from typer.testing import CliRunner  # noqa: E402

from distributed.config import DistConfig  # noqa: E402
from polar_vbll.config import load_config, packaged_config  # noqa: E402
from polar_vbll.errors import ConfigError, UserInputError  # noqa: E402
from polar_vbll.results import RunResults  # noqa: E402
from polar_vbll.tracking import (  # noqa: E402
    TrackingError,
    check_reachable,
    local_store,
    mask_secrets,
    mask_uri,
    safe_params,
)
from polar_vbll_cli.app import app  # noqa: E402
from tune_spaces import spaces  # noqa: E402
from tune_spaces.driver import SearchFailed, SearchSettings, run_search  # noqa: E402
from tune_spaces.trial import apply_params  # noqa: E402


# ------------------------------------------------------------------------------------------ spaces
def test_every_space_samples_valid_run_configs():
    from ray.tune.search.sample import Domain

    base = load_config(packaged_config("run", "tune"), []).model_dump(mode="json")
    for name in spaces.space_names():
        space = spaces.get_space(name)
        assert any(isinstance(v, Domain) for v in space.values()), name
        sample = {k: (v.sample() if isinstance(v, Domain) else v) for k, v in space.items()}
        from tune_spaces.trial import trial_config

        cfg = trial_config(base, sample, "t", "runs")
        flat = cfg.flat_params()
        for key, value in sample.items():
            assert flat[key] == value, (name, key)


def test_unknown_space_lists_the_valid_ones():
    with pytest.raises(UserInputError) as err:
        spaces.get_space("prior")
    for name in ("priors", "ranks", "optimization", "default"):
        assert name in str(err.value)
    result = CliRunner().invoke(app, ["tune", "--space", "nope", "--config", "tiny"])
    assert result.exit_code == 2
    assert "valid spaces: default, optimization, priors, ranks" in result.output


def test_apply_params_sets_dotted_keys_without_touching_the_base():
    base = {"head": {"vbll": {"prior_scale": 1.0, "cov": "diagonal"}}, "polar": {"r": 8}}
    out = apply_params(base, {"head.vbll.prior_scale": 3.0, "polar.r": 4})
    assert out == {"head": {"vbll": {"prior_scale": 3.0, "cov": "diagonal"}}, "polar": {"r": 4}}
    assert base["head"]["vbll"]["prior_scale"] == 1.0


def test_a_space_value_the_config_refuses_is_reported_before_ray_starts(tmp_path, monkeypatch):
    from ray import tune

    monkeypatch.setitem(spaces.SPACES, "bad", lambda: {"head.vbll.prior_scale": tune.choice([1.0, -2.0])})
    cfg = load_config(packaged_config("run", "tiny"), [f"output_dir={tmp_path}", "name=s"])
    with pytest.raises(ConfigError, match=r"head.vbll.prior_scale=-2.0"):
        run_search(cfg, SearchSettings(space="bad"), DistConfig(workers=2))
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------------------------- secrets
def test_mask_uri_hides_passwords_and_secret_query_values():
    assert (
        mask_uri("https://alice:s3cret@mlflow.example.com:5000/x")
        == "https://alice:***@mlflow.example.com:5000/x"
    )
    assert mask_uri("https://ghp_abcdef@host/") == "https://***@host/"
    masked = mask_uri("https://host/api?token=abc123&experiment=7")
    assert "abc123" not in masked and "experiment=7" in masked
    assert mask_uri("sqlite:////tmp/a/mlflow.db") == "sqlite:////tmp/a/mlflow.db"


def test_strip_credentials_removes_user_information_and_secret_query_values():
    from polar_vbll.tracking import TrackingTarget, credentials_note, strip_credentials

    assert strip_credentials("https://alice:s3cret@mlflow.example.com:5000/x") == "https://mlflow.example.com:5000/x"
    assert strip_credentials("https://ghp_abcdef@host/") == "https://host/"
    stripped = strip_credentials("https://host/api?token=abc123&experiment=7")
    assert "abc123" not in stripped and "token" not in stripped and "experiment=7" in stripped
    for clean in ("sqlite:////tmp/a/mlflow.db", "http://127.0.0.1:5000", "file:///tmp/mlruns"):
        assert strip_credentials(clean) == clean and credentials_note(clean) is None
    assert credentials_note("https://alice:s3cret@h/") is not None
    assert TrackingTarget("https://a:b@h/", "r1").shareable() == TrackingTarget("https://h/", "r1")


def test_secrets_never_reach_params():
    params = safe_params(
        {
            "model.path": "/data/m",
            "hub.token": "hf_xyz",
            "store": "postgresql://bob:hunter2@db:5432/mlflow",
            "note": "see https://h/x?api_key=K9&x=1",
        }
    )
    assert params["model.path"] == "/data/m"
    assert params["hub.token"] == "***"
    assert "hunter2" not in params["store"] and "bob:***@db" in params["store"]
    assert "K9" not in params["note"] and "x=1" in params["note"]
    assert "hunter2" not in mask_secrets("could not connect to postgresql://bob:hunter2@db:5432/mlflow")


def test_unreachable_tracking_uri_fails_before_any_training(tmp_path, monkeypatch):
    uri = "http://carol:pa55word@127.0.0.1:9/"  # port 9 (discard): nothing listens
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(TrackingError) as err:
        check_reachable(uri, timeout_s=5)
    assert "carol:***@127.0.0.1:9" in str(err.value) and "pa55word" not in str(err.value)
    cfg = load_config(packaged_config("run", "tiny"), [f"output_dir={tmp_path}", "name=s"])
    t0 = time.perf_counter()
    with pytest.raises(TrackingError):
        run_search(cfg, SearchSettings(space="priors"), DistConfig(workers=2))
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "s" / "trials").exists()


# --------------------------------------------------------------------------------- a real search
@pytest.fixture(scope="module")
def search(tmp_path_factory):
    """A 2-trial ``priors`` search on the tiny model, 2 workers per trial, one trial at a time."""
    root = tmp_path_factory.mktemp("tune")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    cfg = load_config(
        packaged_config("run", "tiny"),
        [
            f"output_dir={root}",
            "name=s",
            "train.steps=4",
            "train.eval_every=2",
            "train.checkpoint_every=2",
            "data.ood_tasks=[arc_challenge]",
            "data.ood_limit=16",
        ],
    )
    dist = DistConfig(workers=2, health_check_interval_s=0.1)
    settings = SearchSettings(space="priors", trials=2, concurrency=1, seed=3)
    t0 = time.perf_counter()
    outcome = run_search(cfg, settings, dist)
    return cfg, settings, dist, outcome, time.perf_counter() - t0


def _store(folder: Path):
    from mlflow.tracking import MlflowClient

    uri, _ = local_store(folder)
    client = MlflowClient(uri)
    record = json.loads((folder / "search.json").read_text())
    return client, record


def test_search_writes_parent_and_child_runs_with_metrics_and_artifacts(search):
    cfg, settings, dist, outcome, seconds = search
    folder = outcome.folder
    assert (folder / "mlflow" / "mlflow.db").is_file()
    client, record = _store(folder)
    parent = client.get_run(record["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["search.space"] == "priors"
    assert "best_val_nll" in parent.data.metrics
    children = client.search_runs(
        [record["experiment_id"]], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 2
    for child in children:
        assert child.info.status in ("FINISHED", "KILLED")
        params = child.data.params
        searched = json.loads(child.data.tags["polar_vbll.searched"])
        assert float(params["head.vbll.prior_scale"]) == pytest.approx(searched["head.vbll.prior_scale"])
        assert params["method"] == "polar_vbll" and params["model.source"] == "tiny"
        history = client.get_metric_history(child.info.run_id, "val_nll")
        assert [h.step for h in history][0] == 2
        for key in ("loss", "orthogonality_error", "stable_rank_mean"):
            assert client.get_metric_history(child.info.run_id, key), key
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert finished, "ASHA keeps at least the first trial to the end"
    for child in finished:
        m = child.data.metrics
        for key in (
            "val_nll",
            "val_ece",
            "val_acc",
            "val_brier",
            "test_nll",
            "test_acc",
            "orthogonality_error",
            "ood_auroc_arc_challenge",
        ):
            assert key in m, key
        assert 0.0 <= m["ood_auroc_arc_challenge"] <= 1.0
        assert m["orthogonality_error"] < 1e-4
        names = _artifact_paths(client, child.info.run_id)
        assert "plots/reliability_validation.png" in names and "plots/reliability_test.png" in names
        assert "model/adapter/adapter_model.safetensors" in names
        assert "model/adapter/adapter_config.json" in names
        assert "model/head.safetensors" in names
        assert "model/MLmodel" in names  # each trial's MLflow model
        png = Path(client.download_artifacts(child.info.run_id, "plots/reliability_test.png"))
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        results = json.loads(Path(client.download_artifacts(child.info.run_id, "results.json")).read_text())
        assert results["metrics"]["validation"]["nll"] == pytest.approx(m["val_nll"])
        RunResults.model_validate(results)  # the one results.json schema, as every entry point writes it
        assert results["entry_point"] == "tune" and results["distributed"]["world_size"] == 2


def _artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for info in client.list_artifacts(run_id, path):
        out |= _artifact_paths(client, run_id, info.path) if info.is_dir else {info.path}
    return out


def test_best_config_is_the_trial_with_the_lowest_validation_nll(search):
    cfg, settings, dist, outcome, seconds = search
    done = [r for r in outcome.rows if r["status"] == "completed"]
    best = min(done, key=lambda r: r["val_nll"])
    assert outcome.best["trial"] == best["trial"]
    loaded = load_config(outcome.best_config_path, [])
    assert loaded.head.vbll.prior_scale == pytest.approx(best["head.vbll.prior_scale"])
    assert loaded.head.vbll.wishart_scale == pytest.approx(best["head.vbll.wishart_scale"])
    assert loaded.train.steps == cfg.train.steps and loaded.model.source == "tiny"
    table = (outcome.folder / "trials.md").read_text().splitlines()
    assert len([ln for ln in table if ln.startswith("| ")]) == 1 + 2  # header + one row per trial


def test_runs_command_lists_the_trials_from_the_store(search):
    outcome = search[3]
    result = CliRunner().invoke(app, ["runs", str(outcome.folder)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    header = lines[0].split()
    assert header[:2] == ["run", "status"] and "val_nll" in header and "test_acc" in header
    assert {"head.vbll.prior_scale", "head.vbll.wishart_scale", "head.vbll.dof"} <= set(header)
    assert "method" not in header  # fixed by the space, not searched
    assert len(lines) == 2 + 2
    searches = CliRunner().invoke(app, ["runs", str(outcome.folder.parent)])
    assert searches.exit_code == 0, searches.output
    row = searches.output.strip().splitlines()[2].split()
    assert row[:3] == ["s", "FINISHED", "priors"]
    assert float(row[3]) == pytest.approx(outcome.best["val_nll"], rel=1e-3)
    missing = CliRunner().invoke(app, ["runs", str(outcome.folder / "nope")])
    assert missing.exit_code == 2 and "not a search folder" in missing.output


def test_rerunning_a_finished_search_resumes_without_new_trials(search):
    cfg, settings, dist, outcome, seconds = search
    again = run_search(cfg, settings, dist)
    client, record = _store(outcome.folder)
    children = client.search_runs(
        [record["experiment_id"]], filter_string=f"tags.`mlflow.parentRunId` = '{record['parent_run_id']}'"
    )
    assert len(children) == 2
    assert again.best["trial"] == outcome.best["trial"]
    assert record["parent_run_id"] == outcome.parent_run_id


@pytest.mark.slow
def test_a_search_whose_trials_all_fail_reports_each_first_error(tmp_path):
    cfg = load_config(
        packaged_config("run", "tiny"),
        [f"output_dir={tmp_path}", "name=f", "polar.target_modules=[no_such_proj]", "train.steps=2"],
    )
    with pytest.raises(SearchFailed) as err:
        run_search(cfg, SearchSettings(space="priors", trials=2, concurrency=1), DistConfig(workers=2))
    text = str(err.value)
    assert "all 2 trials" in text and text.count("  trial ") == 2
    assert "no_such_proj" in text


@pytest.mark.slow  # over 20 s on 2 CPU cores (CI durations, 2026-12-07); -m slow runs it
def test_a_tracked_distributed_training_is_one_mlflow_run(tmp_path, monkeypatch):
    """``polar-vbll train --workers 2`` (tracking on): one run in the run folder's own store, with the
    final metrics equal to results.json and the model artifacts."""
    from mlflow.tracking import MlflowClient

    from distributed.launch import train_distributed

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(
        packaged_config("run", "tiny"),
        [f"output_dir={tmp_path}", "name=t", "method=polar_vbll", "train.steps=2", "train.checkpoint_every=0"],
    )
    results = train_distributed(cfg, dist=DistConfig(workers=2, health_check_interval_s=0.1), track=True)
    client = MlflowClient(local_store(tmp_path / "t")[0])
    (run,) = client.search_runs([client.get_experiment_by_name("polar-vbll-runs").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "t"
    assert run.data.params["method"] == "polar_vbll" and run.data.params["train.steps"] == "2"
    assert run.data.metrics["val_nll"] == pytest.approx(results["metrics"]["validation"]["nll"])
    assert run.data.metrics["test_ece"] == pytest.approx(results["metrics"]["eval"]["ece"])
    names = _artifact_paths(client, run.info.run_id)
    assert {"model/head.safetensors", "plots/reliability_test.png", "results.json"} <= names
    run_copy = "model/artifacts/run"  # the MLflow model, logged by rank 0
    assert {"model/MLmodel", f"{run_copy}/config.yaml", f"{run_copy}/adapter/adapter_config.json"} <= names
    assert results["timings"]["tracking_train_s"] >= 0.0


@pytest.mark.slow  # over 20 s on 2 CPU cores (CI durations, 2026-12-07); -m slow runs it
def test_training_the_best_config_reproduces_the_best_trial(search, tmp_path):
    """best_config.yaml is the best trial's complete config (the space's constants too: ``priors`` runs
    ``polar_vbll`` on the tiny config's ``polar_mle`` base), and training it gives the trial's metrics."""
    from distributed.launch import train_distributed

    cfg, settings, dist, outcome, seconds = search
    best = load_config(outcome.best_config_path, [f"output_dir={tmp_path}"])
    trial_dir = outcome.folder / "trials" / outcome.best["trial"]
    trial = load_config(trial_dir / "config.yaml", [])
    assert best.method == "polar_vbll" and cfg.method == "polar_mle"
    skip = ("name", "output_dir")
    assert {k: v for k, v in best.flat_params().items() if k not in skip} == {
        k: v for k, v in trial.flat_params().items() if k not in skip
    }
    results = train_distributed(best, dist=dist)
    want = json.loads((trial_dir / "results.json").read_text())["metrics"]
    for split in ("validation", "eval"):
        for key in ("acc", "nll", "ece"):
            assert results["metrics"][split][key] == pytest.approx(want[split][key], rel=1e-6, abs=1e-9), (split, key)
