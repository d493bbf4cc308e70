"""A run folder has one writer, and names stay under output_dir (issue #21, item 1).

Two commands writing one folder used to mix their files (the first run's checkpoints beside the second's
config); now the second gets one line naming the holder. A lock left by a dead process is replaced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from polar_vbll.locking import LOCK_NAME, FolderBusy, FolderLock
from polar_vbll_cli.app import app

runner = CliRunner()
CLI = str(Path(sys.executable).parent / "polar-vbll")


def _one_line(result, notes: bool = False) -> str:
    """The one error line of an exit-2 result (``notes``: other lines, e.g. a search's notes, allowed)."""
    lines = [ln for ln in result.output.splitlines() if ln.strip() and (not notes or ln.startswith("error:"))]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    return lines[0]


@pytest.fixture
def holder():
    """Another process holding the lock of a target until the test ends."""
    procs = []

    def hold(target: Path, is_file: bool = False) -> subprocess.Popen:
        code = (f"import time; from polar_vbll.locking import FolderLock; "
                f"l = FolderLock({str(target)!r}, 'a test holder', is_file={is_file}).acquire(); "
                "print('held', flush=True); time.sleep(120)")  # fmt: skip
        p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "held"
        procs.append(p)
        return p

    yield hold
    for p in procs:
        p.kill()
        p.wait()


def test_two_trains_on_one_run_folder_the_second_is_refused_naming_the_first(tmp_path):
    """The reported case, two real processes: the first trains to the end, the second (other settings,
    started while the first writes) exits 2 with one line, and the folder holds only the first run."""
    base = [CLI, "train", "--config", "tiny", "--no-progress", "--no-track", "--set", f"output_dir={tmp_path}"]
    first = subprocess.Popen([*base, "--set", "train.steps=30"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)  # fmt: skip
    lock = tmp_path / "tiny" / LOCK_NAME
    deadline = time.time() + 120
    while not lock.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert lock.exists(), "the first train never took the lock"
    second = subprocess.run([*base, "--set", "optim.lr_theta=0.5"], capture_output=True, text=True, timeout=120)
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out[-2000:]
    lines = [ln for ln in (second.stdout + second.stderr).splitlines() if ln.startswith("error:")]
    assert second.returncode == 2 and len(lines) == 1, second.stdout + second.stderr
    assert f"pid {first.pid}" in lines[0] and "polar-vbll train" in lines[0] and "being written" in lines[0]
    params = json.loads((tmp_path / "tiny" / "params.json").read_text())
    assert params["optim.lr_theta"] == 0.004 and params["train.steps"] == 30  # the first run's, whole
    assert not lock.exists()  # released at the end


def test_every_writing_command_refuses_a_folder_another_process_writes(holder, tmp_path):
    """compare (train: above; calibrate, predict --output and tune: below) refuses in one line, naming the
    holder, and writes nothing."""
    comparison = tmp_path / "compare-tiny"
    p = holder(comparison)
    line = _one_line(runner.invoke(app, ["compare", "--config", "tiny", "--no-progress", "--no-track",
                                         "--set", f"output_dir={tmp_path}"]))  # fmt: skip
    assert f"pid {p.pid}" in line and "a test holder" in line
    assert not (comparison / "compare_config.json").exists()


def test_calibrate_and_predict_refuse_a_locked_run_or_output(holder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    trained = runner.invoke(app, ["train", "--config", "tiny", "--no-progress", "--no-track",
                                  "--set", f"output_dir={out}", "--set", "train.steps=2"])  # fmt: skip
    assert trained.exit_code == 0, trained.output
    run = out / "tiny"
    ok = runner.invoke(app, ["calibrate", str(run), "--risk", "0.5", "--no-progress"])
    assert ok.exit_code == 0, ok.output
    q = out / "q.jsonl"
    q.write_text(json.dumps({"question": "Which is a colour?", "choices": ["red", "dog"]}) + "\n")
    decisions = out / "d.jsonl"
    p = holder(decisions, is_file=True)
    line = _one_line(runner.invoke(app, ["predict", str(run), "-i", str(q), "-o", str(decisions), "--no-progress"]))
    assert f"pid {p.pid}" in line and not decisions.exists()
    p2 = holder(run)
    line = _one_line(runner.invoke(app, ["calibrate", str(run), "--risk", "0.5", "--no-progress"]))
    assert f"pid {p2.pid}" in line


@pytest.mark.extras("ray", "deepspeed", "mlflow")
def test_a_search_refuses_a_folder_another_process_writes(holder, tmp_path):
    p = holder(tmp_path / "s1")
    line = _one_line(runner.invoke(app, ["tune", "--space", "priors", "--config", "tiny", "--trials", "1",
                                         "--name", "s1", "--set", f"output_dir={tmp_path}"]), notes=True)  # fmt: skip
    assert f"pid {p.pid}" in line and not (tmp_path / "s1" / "search.json").exists()


def test_a_stale_lock_from_a_dead_process_is_replaced_with_a_note(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = tmp_path / "tiny"
    folder.mkdir()
    import socket

    (folder / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                                "command": "polar-vbll train", "time": time.time() - 60}))  # fmt: skip
    result = runner.invoke(app, ["train", "--config", "tiny", "--no-progress", "--no-track", "--set",
                                 f"output_dir={tmp_path}", "--set", "train.steps=2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"replacing a stale lock on {folder}" in result.output
    assert not (folder / LOCK_NAME).exists()


def test_the_lock_is_reentrant_in_its_process_and_exclusive_across_processes(tmp_path, holder):
    with FolderLock(tmp_path / "a") as outer:
        with FolderLock(tmp_path / "a"):  # the same process (a comparison's run inside the comparison)
            pass
        assert (tmp_path / "a" / LOCK_NAME).exists() and outer.held  # the inner one did not release it
    assert not (tmp_path / "a" / LOCK_NAME).exists()
    p = holder(tmp_path / "b")
    with pytest.raises(FolderBusy, match=f"pid {p.pid} on "):
        FolderLock(tmp_path / "b").acquire()
    assert os.getpid() != p.pid


@pytest.mark.parametrize("name", ["../../escape", "/tmp/abs-run", "a/b", "..", "x\\y"])
@pytest.mark.parametrize("command", ["train", "compare"])
def test_a_name_that_is_not_a_plain_folder_name_is_refused(command, name, tmp_path):
    key = "name"
    args = [command, "--config", "tiny", "--no-progress", "--no-track", "--set", f"output_dir={tmp_path / 'out'}",
            "--set", f"{key}={name}"]  # fmt: skip
    line = _one_line(runner.invoke(app, args))
    assert "must be a plain folder name" in line
    assert not (tmp_path / "out").exists() and not Path("/tmp/abs-run").exists()
    assert not (tmp_path / "escape").exists()
