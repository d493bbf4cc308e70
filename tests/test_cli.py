"""The ``polar-vbll`` command as a user runs it: a tiny end-to-end run, and bad input ending in one readable
line (exit status 2), never a traceback."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from polar_vbll.results import RunResults
from polar_vbll_cli.app import app

runner = CliRunner()


def _train(tmp_path, *extra: str, track: bool = False):
    return runner.invoke(
        app,
        ["train", "--config", "tiny", "--no-progress", "--track" if track else "--no-track",
         "--set", f"output_dir={tmp_path}", *extra],
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    result = _train(out)
    assert result.exit_code == 0, result.output
    return out / "tiny", result


def test_tiny_run_writes_the_run_folder(tiny_run):
    run, result = tiny_run
    assert "| zero-shot |" in result.output and "| PoLAR-MLE |" in result.output
    for name in ("config.yaml", "params.json", "results.json", "results.md", "reliability.png"):
        assert (run / name).is_file(), name
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "adapter_peft" / "adapter_config.json").is_file()
    results = json.loads((run / "results.json").read_text())
    RunResults.model_validate(results)  # the one results.json schema
    assert results["entry_point"] == "train" and results["distributed"] is None
    assert results["training"]["steps"] == 6 and results["training"]["orthogonality_error"] < 1e-5
    assert results["split_sizes"]["eval"] == 32
    params = json.loads((run / "params.json").read_text())
    assert params["optim.method"] == "riemannian" and params["train.cache_frozen_prefix"] is True


def test_eval_reproduces_training_metrics(tiny_run):
    run, _ = tiny_run
    result = runner.invoke(app, ["eval", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    trained = json.loads((run / "results.json").read_text())["metrics"]
    evaluated = json.loads(result.output[result.output.index("{") :])
    for row in ("zero_shot", "eval"):
        for key in ("acc", "ece", "nll", "brier"):
            assert evaluated[row][key] == pytest.approx(trained[row][key], abs=1e-5), (row, key)


def test_merged_export_has_the_adapted_models_logits(tiny_run, tmp_path):
    from tests.test_export import assert_merged_logits_equal

    run, _ = tiny_run
    loaded = assert_merged_logits_equal(run, tmp_path / "merged")
    assert any(float(m.polar_theta.detach().abs().max()) > 0 for _, m in loaded.adapter.polar_layers())  # an update


def test_export_refuses_a_non_empty_folder_in_one_line(tiny_run, tmp_path):
    run, _ = tiny_run
    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["export", str(run), "--merged", str(dest)])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: ") and "already exists and is not empty" in result.output
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]


def test_rerun_resumes_from_the_last_checkpoint(tiny_run):
    run, _ = tiny_run
    result = _train(run.parent)
    assert result.exit_code == 0, result.output
    assert "resumed from step 6" in result.output


def test_user_jsonl_data_trains(tmp_path):
    rows = [  # the right answer's place rotates: a training split of one answer class is refused
        {"question": f"What is {i} + 1?", "choices": [str(i + 1 + (k - i % 3) % 3) for k in range(3)], "answer": i % 3}
        for i in range(20)
    ]
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = _train(
        tmp_path,
        "--set",
        f"data.task=jsonl:{data}",
        "--set",
        "data.train_limit=null",
        "--set",
        "data.eval_limit=null",
        "--set",
        "data.val_limit=null",
    )
    assert result.exit_code == 0, result.output
    sizes = json.loads((tmp_path / "tiny" / "results.json").read_text())["split_sizes"]
    assert sizes["train"] + sizes["validation"] + sizes["eval"] == 20


def _assert_clean_error(result, *fragments: str):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in result.output, (f, result.output)


def test_bad_jsonl_row_names_file_line_and_field(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(
        '{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "q", "choices": ["a"]}\n'
    )
    result = _train(tmp_path, "--set", f"data.task=jsonl:{data}")
    _assert_clean_error(result, "bad.jsonl", "2")


def test_unknown_config_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  steps: 2\n  lr: 3\n")
    result = runner.invoke(app, ["train", "--config", str(cfg)])
    _assert_clean_error(result, "c.yaml", "train.lr", "unknown key")


def test_missing_model_path(tmp_path):
    result = _train(tmp_path, "--set", "model.source=path", "--set", f"model.path={tmp_path}/none")
    _assert_clean_error(result, "does not exist")


def test_target_module_matching_nothing(tmp_path):
    result = _train(tmp_path, "--set", "polar.target_modules=[qq_proj]")
    _assert_clean_error(result, "qq_proj")


def test_rank_larger_than_layer(tmp_path):
    result = _train(tmp_path, "--set", "polar.r=4096")
    _assert_clean_error(result, "4096")


def test_unknown_task(tmp_path):
    result = _train(tmp_path, "--set", "data.task=arc_medium")
    _assert_clean_error(result, "arc_medium", "arc_easy")


def test_altered_checkpoint_on_resume(tmp_path):
    steps = ["--set", "train.steps=3", "--set", "train.checkpoint_every=1", "--set", "train.keep_checkpoints=1"]
    assert _train(tmp_path, *steps).exit_code == 0
    ckpt = tmp_path / "tiny" / "checkpoint-3" / "state.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:-10])
    result = _train(tmp_path, "--set", "train.steps=5", "--set", "train.keep_checkpoints=1")
    _assert_clean_error(result, "checkpoint-3", "truncated or altered")


def test_damaged_latest_checkpoint_falls_back_to_an_older_intact_one(tmp_path):
    assert _train(tmp_path, "--set", "train.steps=3", "--set", "train.checkpoint_every=1").exit_code == 0
    ckpt = tmp_path / "tiny" / "checkpoint-3" / "state.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:-10])
    with pytest.warns(UserWarning, match=r"checkpoint-3.*truncated or altered.*older intact .*checkpoint-2"):
        result = _train(tmp_path, "--set", "train.steps=3", "--set", "train.checkpoint_every=1")
    assert result.exit_code == 0, result.output
    assert "resumed from step 2" in result.output


def test_a_resume_with_other_training_settings_is_refused_before_anything_is_written(tmp_path):
    """Case 03's kind for checkpoints: a checkpoint is resumed only under the training settings that wrote
    it; otherwise exit 2 naming the keys and how to start fresh, with the run folder untouched."""
    assert _train(tmp_path, "--set", "train.steps=3").exit_code == 0
    run = tmp_path / "tiny"
    before = {p: (run / p).read_bytes() for p in ("config.yaml", "params.json", "results.json")}
    result = _train(tmp_path, "--set", "train.steps=5", "--set", "optim.lr_theta=0.5")
    _assert_clean_error(result, "train.steps: 3 -> 5", "optim.lr_theta: 0.004 -> 0.5", "--no-resume")
    assert {p: (run / p).read_bytes() for p in before} == before  # nothing overwritten before the check
    # evaluation settings may change: the trained model is the same
    assert _train(tmp_path, "--set", "train.steps=3", "--set", "data.eval_limit=8").exit_code == 0
    # a fresh start replaces the old checkpoints, so none of other settings can be resumed later
    fresh = _train(tmp_path, "--set", "train.steps=5", "--set", "optim.lr_theta=0.5", "--no-resume")
    assert fresh.exit_code == 0, fresh.output
    assert [p.name for p in sorted(run.glob("checkpoint-*"))] == ["checkpoint-3", "checkpoint-5"]
    assert json.loads((run / "results.json").read_text())["training"]["steps"] == 5


def test_eval_of_a_folder_that_is_no_run(tmp_path):
    result = runner.invoke(app, ["eval", str(tmp_path)])
    _assert_clean_error(result, "not a run folder")


@pytest.mark.extras("mlflow")
def test_train_is_tracked_in_the_run_folders_mlflow_store(tmp_path, monkeypatch):
    """Single-process `train` writes the same MLflow layout as searches: params, metric histories,
    final metrics, plots, the adapter, the head and results.json; a rerun continues the same MLflow run."""
    from mlflow.tracking import MlflowClient

    from polar_vbll.tracking import local_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert _train(tmp_path, "--set", "method=polar_vbll", track=True).exit_code == 0
    run_dir = tmp_path / "tiny"
    client = MlflowClient(local_store(run_dir)[0])
    (run,) = client.search_runs([client.get_experiment_by_name("polar-vbll-runs").experiment_id])
    results = json.loads((run_dir / "results.json").read_text())
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert run.data.params["method"] == "polar_vbll" and run.data.params["train.steps"] == "6"
    assert run.data.metrics["test_nll"] == pytest.approx(results["metrics"]["eval"]["nll"])
    assert run.data.metrics["zero_shot_acc"] == pytest.approx(results["metrics"]["zero_shot"]["acc"])
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [h["step"] for h in results["training"]["history"]]
    names = set()
    for top in client.list_artifacts(run.info.run_id):
        inner = client.list_artifacts(run.info.run_id, top.path) if top.is_dir else [top]
        names |= {i.path for i in inner}
    assert {"model/head.safetensors", "plots/reliability_test.png", "results.json"} <= names
    assert _train(tmp_path, "--set", "method=polar_vbll", track=True).exit_code == 0  # resumes
    runs = client.search_runs([client.get_experiment_by_name("polar-vbll-runs").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


@pytest.mark.parametrize("command", ["train", "compare", "predict"])
def test_an_output_in_a_submitted_jobs_temporary_working_dir_is_refused_by_every_command(tmp_path, command):
    """``ray job submit --runtime-env`` unpacks the working_dir into Ray's session folder, which Ray deletes:
    a relative output lands there. Every command that writes refuses it in one line, exit 2, nothing
    written (the distributed entry points: tests/test_cluster.py)."""
    job = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    if command == "predict":
        from polar_vbll.errors import UserInputError
        from polar_vbll.predict_io import check_output

        job.mkdir(parents=True)
        with pytest.raises(UserInputError, match="inside Ray's temporary copy of this job's working_dir"):
            check_output(job / "decisions.jsonl", [])
        assert list(job.iterdir()) == []
        return
    args = [command, "--config", "tiny", "--no-track", "--set", f"output_dir={job / 'runs'}"]
    if command == "train":
        args.insert(3, "--no-progress")
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "inside Ray's temporary copy of this job's working_dir" in result.output
    assert not job.exists()


ONE_CLASS = "holds 6 questions, all answered B ('yes'): a model trained on one answer class learns only to give it"


@pytest.mark.parametrize("entry", ["train", "compare", "train --workers", "search trial"])
def test_a_single_class_training_split_is_refused_before_any_work(tmp_path, entry):
    """Every entry point refuses, in one line naming the split, its size and its one class, before any
    folder is made or a model loads; the zero-shot model, which learns nothing from the answers, runs."""
    import yaml

    data = tmp_path / "yes.jsonl"  # ten questions, all answered "yes": the 60% training split holds 6
    data.write_text("".join(json.dumps({"question": f"Is {i} < {i + 1}?", "choices": ["no", "yes"], "answer": "yes"})
                            + "\n" for i in range(10)))  # fmt: skip
    sets = [f"data.task=jsonl:{data}", "data.train_limit=null", "data.val_limit=null", "data.eval_limit=null"]
    out = tmp_path / "runs"
    if entry == "train":
        result = _train(out, *[a for s in sets for a in ("--set", s)])
        _assert_clean_error(result, f"data.task=jsonl:{data}: the training split 'train' (data.split_seed=0)",
                            ONE_CLASS)  # fmt: skip
        assert len(result.output.strip().splitlines()) == 1
    elif entry == "compare":
        cfg = {"name": "c", "output_dir": str(out), "tasks": [f"jsonl:{data}"], "seeds": [0],
               "methods": ["zero_shot", "polar_vbll"],
               "base": {"model": {"source": "tiny", "tiny_hidden": 64, "tiny_layers": 2},
                        "data": {"train_limit": None, "val_limit": None, "eval_limit": None}}}  # fmt: skip
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        result = runner.invoke(app, ["compare", "--config", str(tmp_path / "c.yaml"), "--no-progress", "--no-track"])
        _assert_clean_error(result, ONE_CLASS)
        assert len(result.output.strip().splitlines()) == 1
    else:
        from distributed.config import DistConfig
        from distributed.launch import WORKERS, prepare_run
        from polar_vbll.config import load_config, resolve_config
        from polar_vbll.errors import DataError

        where = WORKERS
        if entry == "search trial":
            where = pytest.importorskip("tune_spaces.driver").TRIAL
        cfg = load_config(resolve_config("tiny", "run"), [f"output_dir={out}", "method=polar_vbll", *sets])
        with pytest.raises(DataError, match=ONE_CLASS.replace("(", r"\(").replace(")", r"\)")):
            prepare_run(cfg, DistConfig(workers=2), where, kind="search" if entry == "search trial" else "run")
    assert not out.exists()  # no run, comparison or search folder


def test_a_one_class_training_split_is_fine_for_the_zero_shot_model_and_refused_for_the_probe(tmp_path):
    """The check follows what a method learns from: the zero-shot model reads no training answers; the linear
    probe trains no adapter but fits its head to them. A built-in task cut to one example is one class too."""
    from polar_vbll.config import load_config, resolve_config
    from polar_vbll.errors import DataError
    from polar_vbll.session import validate_inputs

    def cfg(method, *extra):
        return load_config(resolve_config("tiny", "run"), [f"output_dir={tmp_path}", f"method={method}", *extra])

    import json

    one = tmp_path / "one"
    one.mkdir()
    rows = [{"question": f"q{i}", "choices": ["negative", "positive"], "answer": 1} for i in range(3)]
    (one / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for split in ("validation", "test"):
        (one / f"{split}.jsonl").write_text(json.dumps({**rows[0], "answer": 0}) + "\n")
    validate_inputs(cfg("zero_shot", f"data.task=jsonl:{one}"))
    with pytest.raises(DataError, match=r"holds 3 questions, all answered B \('positive'\)"):
        validate_inputs(cfg("linear_probe", f"data.task=jsonl:{one}"))
    with pytest.raises(DataError, match=r"has 1 example\(s\); linear_probe needs at least 2"):  # too few: first
        validate_inputs(cfg("linear_probe", "data.task=sst2", "data.train_limit=1"))
    validate_inputs(cfg("zero_shot", "data.task=sst2", "data.train_limit=1"))
    validate_inputs(cfg("linear_probe", "data.task=sst2", "data.train_limit=2"))  # seed 0's first two differ
