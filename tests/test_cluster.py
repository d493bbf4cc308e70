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

pytest.importorskip("ray")

from distributed.cluster import check_cluster  # noqa: E402
from polar_vbll.config import load_config, resolve_config  # noqa: E402
from polar_vbll.errors import UserInputError  # noqa: E402

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
    data.write_text("".join(f'{{"question": "q{i}", "choices": ["a", "b"], "answer": 0}}\n' for i in range(20)))
    cfg = _cfg(tmp_path, f"data.task=jsonl:{data}", "data.train_limit=null", "data.val_limit=null",
               "data.eval_limit=null")  # fmt: skip
    blind_to_data = lambda node, paths: [not (node == "b" * 56 and p == str(data)) for p in paths]  # noqa: E731
    with pytest.raises(UserInputError, match=f"{data} does not exist on node 10.0.0.2"):
        check_cluster(cfg, None, NODES, blind_to_data)


@pytest.mark.slow
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
