"""The multi-node checks of ``distributed.cluster`` against a simulated cluster (which node sees which
path), and against a real two-node Ray cluster on this machine (slow)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from distributed.cluster import check_cluster
from polar_vbll.config import load_config, resolve_config
from polar_vbll.errors import UserInputError

NODES = [{"NodeID": "a" * 56, "NodeManagerAddress": "10.0.0.1"}, {"NodeID": "b" * 56, "NodeManagerAddress": "10.0.0.2"}]


def _cfg(tmp_path, *extra):
    return load_config(resolve_config("tiny", "run"), [f"output_dir={tmp_path / 'runs'}", *extra])


def _probe(blind: str | None = None, asked: list | None = None):
    """Node ``blind`` sees nothing; the others see what exists here. Records what was asked."""

    def probe(node_id, paths):
        if asked is not None:
            asked.append((node_id, list(paths)))
        return [node_id != blind and os.path.exists(p) for p in paths]

    return probe


def test_one_node_is_not_checked(tmp_path):
    asked = []
    check_cluster(_cfg(tmp_path), "sqlite:////tmp/x.db", NODES[:1], _probe(asked=asked))
    assert asked == []


def test_a_node_local_output_dir_is_refused_and_the_probe_file_removed(tmp_path):
    with pytest.raises(UserInputError, match=r"output_dir .*runs is not shared: node 10.0.0.2 does not see it; on a "
                                             r"multi-node cluster set output_dir to a filesystem"):  # fmt: skip
        check_cluster(_cfg(tmp_path), None, NODES, _probe(blind="b" * 56))
    assert list((tmp_path / "runs").iterdir()) == []  # the probe file is gone


def test_shared_storage_passes_and_a_uri_is_not_probed(tmp_path):
    asked = []
    check_cluster(_cfg(tmp_path), "http://mlflow.internal:5000", NODES, _probe(asked=asked))
    assert len(asked) == 2 and all(".polar-vbll-shared-" in paths[0] for _, paths in asked)
    asked.clear()
    check_cluster(_cfg(tmp_path, "output_dir=s3://bucket/runs"), None, NODES, _probe(asked=asked))
    assert asked == []  # nothing to probe: a URI is the same storage everywhere, no worker file


def test_tracking_into_a_file_store_is_refused_on_several_nodes(tmp_path):
    with pytest.raises(UserInputError, match="set MLFLOW_TRACKING_URI to a tracking server"):
        check_cluster(_cfg(tmp_path), f"sqlite:///{tmp_path}/mlflow.db", NODES, _probe())


def test_a_data_file_missing_on_a_node_is_named(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(f'{{"question": "q{i}", "choices": ["a", "b"], "answer": {i % 2}}}\n' for i in range(20)))
    cfg = _cfg(tmp_path, f"data.task=jsonl:{data}", "data.train_limit=null", "data.val_limit=null",
               "data.eval_limit=null")  # fmt: skip
    blind_to_data = lambda node, paths: [not (node == "b" * 56 and p == str(data)) for p in paths]  # noqa: E731
    with pytest.raises(UserInputError, match=f"{data} does not exist on node 10.0.0.2"):
        check_cluster(cfg, None, NODES, blind_to_data)


@pytest.mark.slow
@pytest.mark.extras("ray")
def test_two_raylets_on_this_machine(tmp_path):
    """A real two-node cluster (two raylets with their own temp folders): the probe reaches both nodes, a
    shared output_dir passes, a SQLite tracking store is refused."""
    import ray

    from distributed.cluster import worker_nodes

    ray_bin = str(Path(sys.executable).parent / "ray")
    tmp = Path(tempfile.mkdtemp(prefix="rc"))
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    common = ["--num-cpus=1", "--object-store-memory=100000000", "--block"]
    head = subprocess.Popen([ray_bin, "start", "--head", f"--port={port}", f"--temp-dir={tmp / 'h'}",
                             "--include-dashboard=false", *common], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    second = None
    try:
        time.sleep(8)
        second = subprocess.Popen([ray_bin, "start", f"--address=127.0.0.1:{port}", *common], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        ray.init(address=f"127.0.0.1:{port}")
        for _ in range(60):
            if len(worker_nodes()) == 2:
                break
            time.sleep(1)
        assert len(worker_nodes()) == 2
        check_cluster(_cfg(tmp_path), "http://127.0.0.1:5000")  # one disk: shared, passes
        with pytest.raises(UserInputError, match="tracking server"):
            check_cluster(_cfg(tmp_path), f"sqlite:///{tmp_path}/m.db")
    finally:
        ray.shutdown()
        for p in (second, head):
            if p is not None:
                p.terminate()
                p.wait(timeout=60)
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env)
        shutil.rmtree(tmp, ignore_errors=True)


def test_an_output_dir_in_a_submitted_jobs_temporary_working_dir_is_refused_before_anything_is_written(tmp_path):
    """``ray job submit --runtime-env`` unpacks the working_dir into Ray's session folder, so a relative
    output_dir lands there and is deleted with the session: refused before Ray starts, nothing created."""
    from distributed.config import DistConfig
    from distributed.launch import prepare_run

    job_dir = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    cfg = _cfg(tmp_path).model_copy(update={"output_dir": str(job_dir / "runs")})
    with pytest.raises(UserInputError, match=r"inside Ray's temporary copy of this job's working_dir.*"
                                             r"set an absolute output_dir"):  # fmt: skip
        prepare_run(cfg, DistConfig(workers=2))
    assert not job_dir.exists()
    prepare_run(_cfg(tmp_path), DistConfig(workers=2))  # an ordinary folder passes


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.extras("ray", "deepspeed", "mlflow")
def test_ray_job_submit_on_two_nodes_with_a_tracking_server(tmp_path):
    """Issue #14's acceptance: a 2-node Ray cluster on this machine (two raylets, each with its own temp
    folder and one CPU, so the two workers land on different nodes), an ``mlflow server`` on 127.0.0.1, and
    ``ray job submit`` of ``train --workers 2`` at ZeRO-3. Checks: ranks on two nodes and bitwise identical;
    the run folder printed (absolute) at start and end; the final adapter read back through Ray Train's
    storage API equals the one in the run folder; the server holds the run with rank 0's per-step metrics."""
    import json

    from mlflow.tracking import MlflowClient
    from ray.train import Result

    bin_dir = Path(sys.executable).parent
    tmp = Path(tempfile.mkdtemp(prefix="r2"))  # short: Ray's socket paths live under --temp-dir
    port, dash, mport = _free_port(), _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("MLFLOW_TRACKING_URI", None)
    uri = f"http://127.0.0.1:{mport}"
    repo = Path(__file__).resolve().parents[1]
    runtime_env = tmp / "runtime_env.yaml"
    runtime_env.write_text(
        f"working_dir: {repo}\nexcludes: [.git, .venv, .cache, runs, mlruns, '*.safetensors', '*.gguf']\n"
        f"env_vars:\n  MLFLOW_TRACKING_URI: '{uri}'\n  HF_HUB_OFFLINE: '1'\n"
    )
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    common = ["--num-cpus=1", "--object-store-memory=100000000", "--block"]
    procs = [
        subprocess.Popen([str(bin_dir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mport),
                          "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
                          "--artifacts-destination", str(tmp / "mlartifacts"), "--workers", "1"], **quiet),
        subprocess.Popen([str(bin_dir / "ray"), "start", "--head", f"--port={port}", f"--temp-dir={tmp / 'h'}",
                          "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                          *common], **quiet),
    ]  # fmt: skip
    runs = tmp_path / "runs"
    try:
        time.sleep(8)
        procs.append(subprocess.Popen([str(bin_dir / "ray"), "start", f"--address=127.0.0.1:{port}",
                                       f"--temp-dir={tmp / 'w'}", *common], **quiet))  # fmt: skip
        time.sleep(5)
        cmd = [
            str(bin_dir / "ray"), "job", "submit", f"--address=http://127.0.0.1:{dash}",
            f"--runtime-env={runtime_env}", "--",
            str(bin_dir / "polar-vbll"), "train", "--config", "tiny", "--workers", "2", "--zero-stage", "3",
            "--track", "--no-progress", "--dist-set", "health_check_interval_s=0.1",
            "--set", f"output_dir={runs}", "--set", "name=two-nodes",
        ]  # fmt: skip
        out = None
        for _ in range(20):  # the dashboard's job API and the second node take a few seconds to come up
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=repo)
            if out.returncode == 0 or "Connection" not in out.stdout + out.stderr:
                break
            time.sleep(3)
        assert out is not None and out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
        run_dir = runs / "two-nodes"
        assert out.stdout.count(f"run folder: {run_dir}") == 2, out.stdout[-3000:]

        results = json.loads((run_dir / "results.json").read_text())
        d = results["distributed"]
        assert d["world_size"] == 2 and d["zero_stage"] == 3 and d["sharded_load"] is True
        assert len({m["node"] for m in d["memory"]}) == 2, d["memory"]  # one worker per node
        assert d["replica_digests"][0] is not None and len(set(d["replica_digests"])) == 1

        # the final adapter, read back through Ray Train's storage API, is the run folder's
        result = Result.from_path(str(run_dir))
        with result.checkpoint.as_directory() as ckpt:
            stored = Path(ckpt) / "artifacts" / "adapter" / "adapter_model.safetensors"
            assert stored.read_bytes() == (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()

        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name("polar-vbll-runs")
        assert experiment is not None
        (run,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'two-nodes'")
        assert run.info.status == "FINISHED"
        steps = {m.step for m in client.get_metric_history(run.info.run_id, "loss")}
        assert len(steps) >= 2, steps  # per-step metrics, logged by rank 0 on its node
        assert run.data.metrics["test_acc"] == pytest.approx(results["metrics"]["eval"]["acc"])
        assert run.data.params["train.steps"] == "6" and run.data.tags["polar_vbll.method"] == "polar_mle"
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(timeout=60)
        subprocess.run([str(bin_dir / "ray"), "stop", "--force"], capture_output=True, env=env)
        shutil.rmtree(tmp, ignore_errors=True)
