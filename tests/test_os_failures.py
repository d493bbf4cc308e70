"""Every OS and Ray failure is one line (issue #21, item 5), walked per command: a read-only folder, a full
disk while a checkpoint is written (and the older checkpoint intact), a malformed or unreachable Ray
address (bounded: seconds, never a hang), a file of ours truncated or edited, too few examples.

Tests run as root here, where permissions do not stop a write, so a read-only file system and a full disk
are simulated where the write happens (the OSError / SafetensorError the OS and safetensors raise)."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from polar_vbll_cli.app import app

runner = CliRunner()


def _one_error(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def _train(tmp_path, *extra):
    return runner.invoke(app, ["train", "--config", "tiny", "--no-progress", "--no-track", "--set",
                               f"output_dir={tmp_path}", *extra])  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    r = _train(out, "--set", "train.checkpoint_every=3")
    assert r.exit_code == 0, r.output
    return out / "tiny"


def _read_only(path, *args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system", str(path))


def test_a_read_only_run_folder_is_one_line_for_train(tmp_path, monkeypatch):
    import polar_vbll.runner as runner_mod

    monkeypatch.setattr(runner_mod, "write_run_params", lambda cfg, d, p=None: _read_only(d / "config.yaml"))
    line = _one_error(_train(tmp_path))
    assert "Read-only file system on" in line and "config.yaml" in line and "--set output_dir=" in line


def test_a_read_only_run_folder_is_one_line_for_calibrate(trained, monkeypatch):
    from polar_vbll.decisions.rule import DecisionRule

    monkeypatch.setattr(DecisionRule, "save", lambda self, run: _read_only(Path(run) / "decision" / "rule.json"))
    line = _one_error(runner.invoke(app, ["calibrate", str(trained), "--risk", "0.5", "--no-progress"]))
    assert "Read-only file system on" in line and "rule.json" in line


@pytest.mark.extras("mlflow")
def test_a_read_only_tracking_store_is_one_line(tmp_path, monkeypatch):
    import polar_vbll.tracking as tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking, "local_store", lambda folder: _read_only(Path(folder) / "mlflow"))
    line = _one_error(runner.invoke(app, ["train", "--config", "tiny", "--no-progress", "--track", "--set",
                                          f"output_dir={tmp_path}"]))  # fmt: skip
    assert "Read-only file system on" in line and "mlflow" in line


def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_the_older_one_is_intact(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import polar_vbll.checkpoint as ckpt

    real = ckpt.save_file
    calls = {"n": 0}

    def fill_up(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: the disk is full
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                                  "\"No space left on device\" })")  # fmt: skip
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", fill_up)
    line = _one_error(_train(tmp_path, "--set", "train.checkpoint_every=3"))
    assert "no space left on the device" in line and "the last complete checkpoint is intact" in line
    run = tmp_path / "tiny"
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-3"]  # no half-written one beside it
    ckpt.load_checkpoint(run / "checkpoint-3")  # intact (its hash verifies)


@pytest.mark.extras("ray", "deepspeed")
@pytest.mark.parametrize("address", ["notanaddress", "127.0.0.1:1"])
@pytest.mark.parametrize("command", ["train", "tune", "predict"])
def test_a_bad_ray_address_is_one_line_within_seconds(command, address, trained, tmp_path, monkeypatch):
    if command == "tune":
        pytest.importorskip("mlflow")
    monkeypatch.setenv("RAY_ADDRESS", address)  # as a submitted job or a user's shell would set it
    args = {
        "train": ["train", "--config", "tiny", "--workers", "2", "--no-track", "--set", f"output_dir={tmp_path}"],
        "tune": ["tune", "--space", "priors", "--config", "tiny", "--set", f"output_dir={tmp_path}"],
        "predict": ["predict", str(trained), "-i", str(tmp_path / "q.jsonl"), "-o", str(tmp_path / "d.jsonl"),
                    "--workers", "2"],
    }[command]  # fmt: skip
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "Which?", "choices": ["a", "b"]}) + "\n")
    (trained / "decision").exists() or runner.invoke(app, ["calibrate", str(trained), "--risk", "0.5"])
    t0 = time.perf_counter()
    line = _one_error(runner.invoke(app, args))
    assert time.perf_counter() - t0 < 30
    assert address in line and ("expected host:port" in line or "cannot reach a Ray cluster" in line)


@pytest.mark.parametrize("damage", ["truncate", "edit"])
def test_a_truncated_or_edited_search_record_is_one_line(damage, tmp_path):
    pytest.importorskip("mlflow")
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "search.json").write_text('{"settings": {"space": "pri' if damage == "truncate" else "[1, 2]")
    line = _one_error(runner.invoke(app, ["runs", str(folder)]))
    assert "the search record" in line and str(folder / "search.json") in line


def test_a_truncated_comparison_record_is_done_again_with_a_warning(tmp_path):
    args = ["compare", "--config", "tiny", "--no-progress", "--no-track", "--set", f"output_dir={tmp_path}",
            "--set", "tasks=[arc_easy]", "--set", "seeds=[0]", "--set", "methods=[zero_shot]", "--set", "ood=null"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    records = tmp_path / "compare-tiny" / "records.jsonl"
    text = records.read_text()
    records.write_text(text[: len(text) // 2])  # a kill or a full disk cut the last line
    with pytest.warns(UserWarning, match=r"records.jsonl: line\(s\) \[1\] damaged"):
        again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert json.loads(records.read_text().splitlines()[-1])["method"] == "zero_shot"  # done again, recorded


@pytest.mark.parametrize(
    "name", ["readout.json", "head.safetensors", "adapter/adapter_config.json", "decision/rule.json"]
)
@pytest.mark.parametrize("damage", ["truncate", "edit"])
def test_a_truncated_or_edited_run_file_is_one_line_for_predict(name, damage, trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    if not (run / "decision").exists():
        assert runner.invoke(app, ["calibrate", str(run), "--risk", "0.5", "--no-progress"]).exit_code == 0
    target = run / name
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    else:
        i = len(data) // 2 if name.endswith("safetensors") else data.rfind(b"0.")
        target.write_bytes(data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :])
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "Which?", "choices": ["a", "b"]}) + "\n")
    line = _one_error(runner.invoke(app, ["predict", str(run), "-i", str(tmp_path / "q.jsonl"), "-o",
                                          str(tmp_path / "d.jsonl"), "--no-progress"]))  # fmt: skip
    assert name.split("/")[-1] in line or "rule" in line, line
    assert not (tmp_path / "d.jsonl").exists()


@pytest.mark.parametrize("method", ["polar_mle", "polar_laplace", "polar_vbll", "linear_probe"])
def test_too_few_examples_for_the_method_is_one_line(method, tmp_path):
    line = _one_error(_train(tmp_path, "--set", "data.train_limit=1", "--set", f"method={method}"))
    assert "has 1 example(s)" in line and f"{method} needs at least 2" in line
    assert not (tmp_path / "tiny").exists()


def test_os_error_lines_name_the_file_and_what_to_do():
    from polar_vbll_cli.app import os_error_line

    assert os_error_line(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/x/ck")).startswith(
        "No space left on device on /x/ck; free space")  # fmt: skip
    assert "no permission" in os_error_line(PermissionError(errno.EACCES, "Permission denied", "/x"))
    assert os_error_line(OSError("something odd")) == "something odd"
