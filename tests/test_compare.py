"""``polar-vbll compare`` on a tiny model: the table, the CSV, resumption, and shared trainings."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from typer.testing import CliRunner

from polar_vbll.compare.config import load_compare_config
from polar_vbll.compare.report import MAJORITY, UNIFORM, aggregate, markdown_table, mean_std, table_rows
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
    assert "AUROC MSP (%)" in result.output and "AUROC epistemic (%)" in result.output
    assert "| openbookqa | uniform predictor |" in result.output  # the guard rows lead every task
    assert "| openbookqa | LoRA-MLE + TS |" in result.output  # an MLE method's temperature-scaled twin
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 * 2
    assert {r["method"] for r in rows} == set(TINY["methods"])
    assert (out / "reliability_openbookqa.png").stat().st_size > 0
    md = (out / "results.md").read_text()
    # main table: 2 guard predictors, 5 methods and LoRA-MLE + TS; OOD table: every method row but the guards
    assert md.count("| openbookqa |") == 2 + 5 + 1 + (5 + 1)
    assert md.count("| openbookqa | arc_challenge |") == 5 + 1


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
    ood = by[("polar_vbll", 1)]["ood"]["arc_challenge"]
    assert 0 <= ood["auroc_msp"] <= 1 and 0 <= ood["auroc_epistemic"] <= 1  # VBLL has an epistemic part
    assert by[("lora_mle", 1)]["ood"]["arc_challenge"]["auroc_epistemic"] is None  # a single MLE model has none
    assert by[("ensemble", 1)]["ood"]["arc_challenge"]["auroc_epistemic"] is not None
    assert by[("lora_mle", 0)]["temperature"] > 0 and by[("polar_vbll", 0)]["temperature"] is None
    assert by[("polar_vbll", 0)]["head_fits"] and by[("polar_vbll", 0)]["chance"]["chance_acc"] > 0


@pytest.mark.extras("mlflow")
def test_compare_is_one_mlflow_parent_run_with_a_child_per_task_method_seed(compared):
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
        assert "model/MLmodel" in {a.path for a in client.list_artifacts(child.info.run_id, "model")}  # its model
    from polar_vbll.mlflow_model import run_target

    child_folder = out / "openbookqa" / "polar_vbll" / "seed0"  # found in the comparison's store
    assert run_target(child_folder).run_id in {c.info.run_id for c in children}


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


def test_table_rows_lead_with_the_guard_and_flag_chance_level_methods():
    chance = {"uniform": {"acc": 0.5, "ece": 0.0, "nll": 0.693, "brier": 0.5, "n": 100},
              "majority": {"acc": 0.55, "ece": 0.05, "nll": 0.69, "brier": 0.49, "n": 100},
              "chance_acc": 0.55, "chance_se": 0.05}  # fmt: skip
    recs = [
        {"task": "t", "method": m, "seed": s, "metrics": {"acc": a, "ece": 0.1, "nll": 0.6, "brier": 0.4, "n": 100},
         "chance": chance, "at_chance": a < 0.65, "ts_metrics": ts, "ood": {}}
        for s in (0, 1) for m, a, ts in (("mle", 0.8, {"acc": 0.8, "ece": 0.02, "nll": 0.5, "brier": 0.3, "n": 100}),
                                         ("flat", 0.56, None))
    ]  # fmt: skip
    rows = aggregate(table_rows(recs, {"mle": "MLE", "flat": "Flat"}))
    assert [r["method"] for r in rows] == [UNIFORM, MAJORITY, "MLE", "MLE + TS", "Flat"]
    table = markdown_table(rows)
    assert "| t | Flat | 56.0 ± 0.0 |" in table and "**at chance** |" in table.splitlines()[-1]
    assert "| no |" in table.splitlines()[4]  # MLE
    assert rows[0]["seeds"] == 2 and rows[0]["acc_mean"] == pytest.approx(50.0)


def test_decision_table_shows_the_decision_rule_per_method():
    from polar_vbll.compare.report import aggregate, decision_table, table_rows
    from polar_vbll.compare.runner import _with_decision

    split = {"acc": 0.75, "ece": 0.05, "nll": 0.5, "brier": 0.3, "n": 100, "aurc": 0.12}
    recs = []
    for seed, (answered, size) in enumerate([(0.40, 1.2), (0.60, 1.4)]):
        dec = {"coverage": answered, "selective_risk": 0.05, "lac": {"coverage": 0.91, "mean_size": size},
               "aps": {"coverage": 0.95, "mean_size": size + 0.3}}  # fmt: skip
        recs.append({"task": "sst2", "method": "polar_vbll", "seed": seed, "metrics": _with_decision(split, dec)})
    rows = aggregate(table_rows(recs, {"polar_vbll": "PoLAR-VBLL"}))
    table = decision_table(rows)
    row = "| sst2 | PoLAR-VBLL | 75.0 ± 0.0 | 0.120 ± 0.000 | 50.0 ± 14.1 | 5.0 ± 0.0 | 91.0 ± 0.0 | 1.30 ± 0.14 |"
    assert row in table
    assert decision_table(aggregate(table_rows([{**recs[0], "metrics": split}], {}))) == ""


def test_a_task_named_by_a_path_keeps_its_runs_inside_the_comparison(tmp_path, monkeypatch):
    """A user's file named relative to the working folder (``jsonl:../data/x.jsonl``) gets a plain folder of
    its own (``task_folder``): run folders and the reliability diagram inside the comparison's folder, never a
    ``jsonl:..`` folder chain or a file name with a separator (which stopped the comparison at its diagram)."""
    import random

    from polar_vbll.config import check_name
    from polar_vbll.tasks import task_folder

    data = tmp_path / "data"
    data.mkdir()
    rng = random.Random(0)
    with (data / "x.jsonl").open("w") as fh:
        for i in range(40):
            fh.write(json.dumps({"question": f"Is {i} even?", "choices": ["yes", "no"], "answer": rng.randint(0, 1)})
                     + "\n")  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    task = "jsonl:../data/x.jsonl"
    cfg = deep_merge(TINY, {"tasks": [task], "seeds": [0], "methods": ["zero_shot", "polar_mle"]})
    cfg.pop("ood")
    result = runner.invoke(app, ["compare", "--config", _write(tmp_path, cfg), "--no-progress"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "runs" / "t"
    folder = task_folder(task)
    assert folder.startswith("jsonl-x-") and check_name(folder) == folder
    assert {p.name for p in out.iterdir() if p.is_dir()} - {"mlflow"} == {folder}
    assert (out / folder / "polar_mle" / "seed0" / "results.json").is_file()
    assert (out / f"reliability_{folder}.png").stat().st_size > 0
    assert f"| {task} | PoLAR-MLE |" in result.output  # the table names the task as the user wrote it


def test_task_folders_are_plain_names_one_per_task():
    from polar_vbll.config import check_name
    from polar_vbll.tasks import task_folder

    assert [task_folder(t) for t in ("sst2", "mmlu:anatomy")] == ["sst2", "mmlu:anatomy"]  # unchanged
    paths = ["jsonl:../a/x.jsonl", "jsonl:../b/x.jsonl", "jsonl:/abs/x.jsonl", "hf:/data/sets/sst5/", "hf:org/x",
             "jsonl:../../../../etc", "csv:C:\\data\\x.csv", ".."]  # fmt: skip
    folders = [task_folder(t) for t in paths]
    assert len(set(folders)) == len(paths)  # the same file name in two folders: two folders
    for f in folders:
        assert check_name(f) == f and f not in (".", "..")
    assert folders[3].startswith("hf-sst5-") and folders[5].startswith("jsonl-etc-")


@pytest.mark.extras("mlflow")
def test_ood_metric_names_of_a_task_named_by_a_path_are_valid_mlflow_keys():
    """MLflow refuses a metric key that a path normalisation would change (``x/../y``): an OOD task named by
    a path is keyed by its plain folder name (mlflow's own validator is the oracle)."""
    from mlflow.utils.validation import _validate_metric_name

    from polar_vbll.results import flat_metrics

    split = {"acc": 0.5, "ece": 0.1, "nll": 0.7, "brier": 0.5}
    ood = {"acc": 0.4, "auroc_msp": 0.6, "auroc_entropy": 0.6}
    tasks = ["arc_challenge", "mmlu:anatomy", "jsonl:data/../ood/x.jsonl", "jsonl:../ood//y.jsonl"]
    out = flat_metrics({"metrics": {"validation": split, "eval": split, "ood": dict.fromkeys(tasks, ood)}})
    assert "ood_auroc_arc_challenge" in out and "ood_acc_mmlu_anatomy" in out  # built-in names unchanged
    assert sum(k.startswith("ood_acc_jsonl-x-") or k.startswith("ood_acc_jsonl-y-") for k in out) == 2
    for key in out:
        _validate_metric_name(key)
