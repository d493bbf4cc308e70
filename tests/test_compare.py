"""``polar-vbll compare`` on a tiny model: the table, the CSV, resumption, and shared trainings."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from typer.testing import CliRunner

from polar_vbll.compare.config import load_compare_config
from polar_vbll.compare.report import aggregate, mean_std
from polar_vbll.config import deep_merge
from polar_vbll.errors import ConfigError
from polar_vbll.results import RunResults
from polar_vbll_cli.app import app

runner = CliRunner()

TINY = {
    "name": "t",
    "tasks": ["openbookqa"],
    "seeds": [0, 1],
    "methods": ["zero_shot", "lora_mle", "laplace", "ensemble", "polar_vbll"],
    "base": {
        "model": {"source": "tiny", "tiny_hidden": 64, "tiny_layers": 2, "max_length": 96},
        "data": {"train_limit": 16, "val_limit": 8, "eval_limit": 12},
        "polar": {"r": 2, "alpha": 4, "layers": [-1]},
        "lora": {"r": 2, "alpha": 4, "layers": [-1]},
        "train": {"steps": 2, "batch_size": 4, "eval_batch_size": 16, "round_steps": 1},
        "head": {"vbll": {"mc_samples": 100}, "fit": {"steps": 3}},
    },
    "ood": {"train_task": "openbookqa", "eval_tasks": ["arc_challenge"], "limit": 8},
}


def _write(tmp_path, cfg) -> str:
    p = tmp_path / "cmp.yaml"
    p.write_text(yaml.safe_dump({**cfg, "output_dir": str(tmp_path / "runs")}))
    return str(p)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cmp")
    path = _write(tmp, TINY)
    result = runner.invoke(app, ["compare", "--config", path, "--no-progress"])
    assert result.exit_code == 0, result.output
    return tmp / "runs" / "t", path, result


def test_table_csv_and_diagrams(compared):
    out, _, result = compared
    for method in TINY["methods"]:  # every run is an ordinary run folder with the one results.json schema
        for seed in TINY["seeds"]:
            results = json.loads((out / "openbookqa" / method / f"seed{seed}" / "results.json").read_text())
            RunResults.model_validate(results)
            assert (results["entry_point"], results["method"]) == ("compare", method)
    assert "| openbookqa | PoLAR-VBLL |" in result.output
    assert "AUROC MSP arc_challenge (%)" in result.output and "AUROC entropy arc_challenge (%)" in result.output
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 * 2
    assert {r["method"] for r in rows} == set(TINY["methods"])
    assert (out / "reliability_openbookqa.png").stat().st_size > 0
    assert (out / "results.md").read_text().count("| openbookqa |") == 5


def test_passes_per_example_and_shared_training(compared):
    out, _, _ = compared
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    by = {(r["method"], r["seed"]): r for r in records}
    assert by[("zero_shot", 0)]["passes_per_example"] == 1
    assert by[("ensemble", 0)]["passes_per_example"] == 3
    assert by[("polar_vbll", 0)]["passes_per_example"] == 1
    # the Laplace baseline reuses the LoRA-MLE training of the same seed instead of training again
    assert by[("laplace", 0)]["train_s"] == by[("lora_mle", 0)]["train_s"]
    # its mean prediction is the same model's, its probabilities are not
    assert by[("laplace", 0)]["metrics"]["nll"] != by[("lora_mle", 0)]["metrics"]["nll"]
    # seeds differ
    assert (
        by[("lora_mle", 0)]["params"]["lora.init_seed"] == 0
        and by[("lora_mle", 1)]["params"]["lora.init_seed"] == 1
    )
    assert "ood_auroc_arc_challenge" in by[("polar_vbll", 1)]["metrics"]


def test_compare_is_one_mlflow_parent_run_with_a_child_per_task_method_seed(compared):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from polar_vbll.tracking import local_store

    out, _, _ = compared
    client = MlflowClient(local_store(out)[0])
    exp = client.get_experiment_by_name("polar-vbll-compare-t")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("polar_vbll.role") == "compare"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED"
    assert sorted(r.info.run_name for r in children) == sorted(
        f"openbookqa/{m}/seed{s}" for m in TINY["methods"] for s in TINY["seeds"]
    )
    records = {(r["method"], r["seed"]): r for r in map(json.loads, (out / "records.jsonl").read_text().splitlines())}
    for child in children:
        _, method, seed = child.info.run_name.split("/")
        assert child.info.status == "FINISHED" and child.data.params["method"] == method
        expected = records[(method, int(seed.removeprefix("seed")))]["metrics"]["nll"]
        assert child.data.metrics["test_nll"] == pytest.approx(expected)


def test_rerun_skips_finished_runs(compared):
    out, path, _ = compared
    before = (out / "records.jsonl").read_text()
    result = runner.invoke(app, ["compare", "--config", path, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "-- openbookqa" not in result.output  # nothing ran again
    assert (out / "records.jsonl").read_text() == before


def test_unknown_method_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="polar_vbll"):
        load_compare_config(_write(tmp_path, {**TINY, "methods": ["polar_magic"]}))


def test_bad_base_fails_before_training(tmp_path):
    bad = deep_merge(TINY, {"base": {"train": {"stepz": 3}}})
    result = runner.invoke(app, ["compare", "--config", _write(tmp_path, bad)])
    assert result.exit_code == 2 and "train.stepz" in result.output


def test_aggregate_mean_and_sample_std():
    recs = [
        {"task": "a", "method": "m", "seed": s, "metrics": {"acc": v, "nll": 1.0, "n": 4}, "train_s": 2.0}
        for s, v in enumerate([0.5, 0.75])
    ]
    (row,) = aggregate(recs)
    assert row["acc_mean"] == pytest.approx(62.5) and row["acc_std"] == pytest.approx(17.677669529663689)
    assert row["nll_std"] == 0.0 and row["seeds"] == 2 and row["train_s"] == 2.0
    assert mean_std([3.0]) == (3.0, 0.0)
