"""A tracked run's MLflow model (polar_vbll.mlflow_model): logged at the end of training, logged again with
the rule by ``calibrate``, loaded by ``mlflow.pyfunc.load_model`` in a fresh process with the records of
``polar-vbll predict``, registered by ``polar-vbll register`` (docs/deploy.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from polar_vbll_cli.app import app
from tests.records import QUESTIONS, predict_cli

pytestmark = pytest.mark.extras("mlflow")

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def _artifacts(uri: str, run_id: str, path: str) -> set[str]:
    from polar_vbll.tracking import client_for

    return {a.path for a in client_for(uri).list_artifacts(run_id, path)}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A tiny tracked run (its model logged at the end, without a rule), then calibrated (logged again)."""
    from polar_vbll.mlflow_model import run_target

    out = tmp_path_factory.mktemp("deploy")
    result = runner.invoke(app, ["train", "--config", "tiny", "--no-progress", "--track",
                                 "--set", f"output_dir={out}"])  # fmt: skip
    assert result.exit_code == 0, result.output
    run = out / "tiny"
    target = run_target(run)
    assert "model/MLmodel" in _artifacts(target.uri, target.run_id, "model")  # logged by train, before calibrate
    files = _artifacts(target.uri, target.run_id, "model/artifacts/run")
    assert not any(p.endswith("decision") for p in files)
    assert {f"model/artifacts/run/{n}" for n in ("adapter", "head.safetensors", "readout.json", "config.yaml",
                                                  "params.json", "tokenizer")} <= files  # fmt: skip
    assert "model/artifacts/run/tokenizer/tokenizer_config.json" in _artifacts(
        target.uri, target.run_id, "model/artifacts/run/tokenizer")
    result = runner.invoke(app, ["calibrate", str(run), "--risk", "0.9", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"MLflow model (with the rule): runs:/{target.run_id}/model" in result.output
    assert "model/artifacts/run/decision" in _artifacts(target.uri, target.run_id, "model/artifacts/run")
    return run, target


LOAD = """
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
frame = pd.DataFrame(json.loads(sys.argv[2]))
print("RECORDS " + json.dumps(model.predict(frame)))
"""


def _load_in_fresh_process(uri: str, store: str) -> list[dict]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", LOAD, uri, json.dumps(QUESTIONS)], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RECORDS "))
    return json.loads(line[len("RECORDS ") :])


def test_logged_model_loads_in_a_fresh_process_and_predicts_the_cli_records(tracked_run, tmp_path):
    run, target = tracked_run
    expected = predict_cli(run, QUESTIONS, tmp_path)
    got = _load_in_fresh_process(f"runs:/{target.run_id}/model", target.uri)
    assert got == expected
    assert [r["id"] for r in got] == ["q1", "q2", "q3"] and "correct" in got[1] and "correct" not in got[0]


def test_register_then_models_uri_loads_and_include_base_bundles_the_base(tracked_run, tmp_path):
    import mlflow
    import pandas as pd

    run, target = tracked_run
    result = runner.invoke(app, ["register", str(run), "--name", "tiny-decisions"])
    assert result.exit_code == 0, result.output
    assert "version 1: models:/tiny-decisions/1" in result.output
    result = runner.invoke(app, ["register", str(run), "--name", "tiny-decisions", "--include-base"])
    assert result.exit_code == 0, result.output
    assert "version 2: models:/tiny-decisions/2" in result.output
    mlflow.set_tracking_uri(target.uri)
    mlflow.set_registry_uri(target.uri)
    try:
        first = mlflow.pyfunc.load_model("models:/tiny-decisions/1").predict(pd.DataFrame(QUESTIONS))
        bundled = mlflow.pyfunc.load_model("models:/tiny-decisions/2")
        second = bundled.predict(pd.DataFrame(QUESTIONS))
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    assert first == predict_cli(run, QUESTIONS, tmp_path)
    served = _served(bundled, QUESTIONS)  # what `mlflow models serve` answers: the same records as JSON
    assert served == first
    assert second == first  # the same model, its base read from the bundle
    cfg = bundled.unwrap_python_model().predictor.folder.cfg
    assert cfg.model.source == "path" and cfg.model.path.endswith("/base")
    assert (Path(cfg.model.path) / "model.safetensors").is_file()


def _served(model, rows: list[dict]) -> list[dict]:
    """The scoring server's answer (``mlflow models serve``'s app, in process) to ``dataframe_records``."""
    testclient = pytest.importorskip("fastapi.testclient")
    from mlflow.pyfunc import scoring_server

    response = testclient.TestClient(scoring_server.init(model)).post("/invocations", json={"dataframe_records": rows})
    assert response.status_code == 200, response.text[:500]
    return response.json()["predictions"]


def test_register_refuses_an_untracked_run_in_one_line(tracked_run, tmp_path):
    import shutil

    run, _ = tracked_run
    copy = tmp_path / "untracked"
    copy.mkdir()
    for name in ("config.yaml", "params.json", "readout.json", "head.safetensors"):
        shutil.copy2(run / name, copy / name)
    shutil.copytree(run / "adapter", copy / "adapter")
    result = runner.invoke(app, ["register", str(copy), "--name", "x"])
    assert result.exit_code == 2
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "was not tracked in MLflow (mlflow_run.json is missing)" in lines[0]
