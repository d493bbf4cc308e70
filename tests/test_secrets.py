"""Secrets never printed (issue #21, item 3): a tracked run against an MLflow server on 127.0.0.1 whose URI
carries a user and password prints neither, whoever prints (this package, MLflow's own "View run ... at:"
lines, a library's log records), in one process and on Ray workers."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.extras("mlflow")

SECRET = "pa55-Wd-4711"
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 (the test's own store); its URI with credentials in it."""
    pytest.importorskip("flask")  # a dev dependency: `mlflow server` needs it beside mlflow-skinny
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db", "--artifacts-destination", str(tmp / "art"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    yield f"http://alice:{SECRET}@127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


def _run(args: list[str], uri: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    return subprocess.run([str(Path(sys.executable).parent / "polar-vbll"), *args, "--set", f"output_dir={tmp_path}"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)  # fmt: skip


def test_a_tracked_run_never_prints_the_tracking_password(server, tmp_path):
    proc = _run(["train", "--config", "tiny", "--track", "--no-progress"], server, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "View run" in out and "alice:***@127.0.0.1" in out  # MLflow's own line ran, masked
    assert SECRET not in out
    for f in tmp_path.rglob("*"):  # nor in anything the run wrote
        if f.is_file() and f.suffix in (".json", ".yaml", ".md", ".jsonl", ".txt"):
            assert SECRET not in f.read_text(errors="replace"), f


@pytest.mark.slow
@pytest.mark.extras("ray", "deepspeed", "mlflow")
def test_a_tracked_run_on_workers_never_prints_the_tracking_password(server, tmp_path):
    proc = _run(["train", "--config", "tiny", "--workers", "2", "--track", "--dist-set",
                 "health_check_interval_s=0.1"], server, tmp_path)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert SECRET not in out


def test_library_log_records_and_prints_are_masked_while_tracking(capsys):
    """The mechanism for any library: inside ``masked_console`` a print and an ``mlflow`` log record that
    hold a credential-bearing URI come out masked; outside, streams are restored."""
    from polar_vbll.tracking import masked_console

    log = logging.getLogger("mlflow.somewhere")
    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger("mlflow").addHandler(handler)
    try:
        with masked_console():
            print(f"View run at: http://bob:{SECRET}@host:5000/#/runs/1")
            log.warning("retrying http://bob:%s@host:5000", SECRET)
            handler.flush()
    finally:
        logging.getLogger("mlflow").removeHandler(handler)
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    assert "bob:***@host:5000" in captured.out and "bob:***@host:5000" in captured.err
