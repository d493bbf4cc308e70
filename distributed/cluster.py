"""What a multi-node cluster needs that one machine gives for free, checked before training starts.

On one node every process sees the driver's files. On several, a run works only when

- ``output_dir`` (Ray Train's storage path: checkpoints written by rank 0, read back by a restarted group,
  the final artifacts the driver copies into the run folder) is the same storage on every node: a
  filesystem mounted at the same path everywhere, or a URI (``s3://...``, read through pyarrow);
- every file a worker reads (a ``jsonl:`` data file, a ``model.path`` folder) exists on every node;
- tracking goes to a server (``MLFLOW_TRACKING_URI=http(s)://...``): rank 0 may run on another node than
  the driver, and the run folder's embedded SQLite store is a file on the driver's disk.

:func:`check_cluster` probes each node with a zero-CPU task pinned to it (a file the driver writes must be
readable there; each path must exist there) and raises ``UserInputError`` with one line saying what to set.
On one node it does nothing.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from polar_vbll.config import RunConfig
from polar_vbll.errors import UserInputError

#: ``sees(node_id, paths) -> [bool per path]``: what a node can read (a Ray task in production).
Probe = Callable[[str, Sequence[str]], list[bool]]


def worker_nodes() -> list[dict]:
    """The alive nodes that can host a worker (CPU or GPU resources)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive") and (n["Resources"].get("CPU", 0) > 0
                                                            or n["Resources"].get("GPU", 0) > 0)]  # fmt: skip


def _ray_probe(node_id: str, paths: Sequence[str]) -> list[bool]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def exists(ps: list[str]) -> list[bool]:
        return [os.path.exists(p) for p in ps]

    strategy = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
    return ray.get(exists.options(scheduling_strategy=strategy).remote(list(paths)), timeout=120)


def worker_files(cfg: RunConfig) -> list[str]:
    """Files and folders the workers read: ``jsonl:`` data (task and OOD tasks) and ``model.path``."""
    files = [t.removeprefix("jsonl:") for t in [cfg.data.task, *cfg.data.ood_tasks] if t.startswith("jsonl:")]
    if cfg.model.source == "path" and cfg.model.path:
        files.append(cfg.model.path)
    return files


def check_worker_memory(workers: int, budget_mb: int | None, nodes: list[dict] | None = None) -> None:
    """Refuse, in one line, a per-worker memory budget (``dist.worker_memory_mb``) that the cluster's nodes
    cannot give every worker: Ray would leave the run pending forever. A node holds as many workers as its
    ``memory`` resource (bytes) has whole budgets. ``nodes``: the cluster's (default: Ray's)."""
    if budget_mb is None:
        return
    nodes = worker_nodes() if nodes is None else nodes
    room = [int(n["Resources"].get("memory", 0)) // (budget_mb * 2**20) for n in nodes]
    if sum(room) < workers:
        largest = max((int(n["Resources"].get("memory", 0)) for n in nodes), default=0) // 2**20
        raise UserInputError(
            f"dist.worker_memory_mb={budget_mb}: {workers} workers need {workers * budget_mb:,} MiB of Ray's memory "
            f"resource, but the cluster's {len(nodes)} node(s) have room for {sum(room)} such worker(s) (the largest "
            f"offers {largest:,} MiB); lower the budget, use fewer workers, or add nodes"
        )


def check_cluster(
    cfg: RunConfig, tracking_uri: str | None, nodes: list[dict] | None = None, probe: Probe | None = None
) -> None:
    """Refuse, in one line each, what a multi-node cluster cannot run (see the module docstring): a
    node-local ``output_dir``, a file missing on a node, tracking into a file store. ``nodes`` / ``probe``:
    the cluster's nodes and how to ask one of them (default: Ray's)."""
    nodes = worker_nodes() if nodes is None else nodes
    if len(nodes) <= 1:
        return
    probe = probe or _ray_probe
    if tracking_uri is not None and not tracking_uri.startswith(("http://", "https://", "databricks")):
        raise UserInputError(
            f"this cluster has {len(nodes)} nodes: rank 0 may log from another node than this one, which cannot "
            f"write to the tracking store {tracking_uri.split('?')[0]} on this machine's disk; set "
            "MLFLOW_TRACKING_URI to a tracking server (e.g. http://mlflow.internal:5000), or use --no-track"
        )
    marker = None
    if "://" not in cfg.output_dir:
        root = Path(cfg.output_dir)
        root.mkdir(parents=True, exist_ok=True)
        marker = root / f".polar-vbll-shared-{uuid.uuid4().hex}"
        marker.write_text("written by the driver; every node must see it\n")
    try:
        paths = ([str(marker)] if marker is not None else []) + worker_files(cfg)
        if not paths:
            return
        for node in nodes:
            seen = probe(node["NodeID"], paths)
            where = node.get("NodeManagerAddress", node["NodeID"][:12])
            if marker is not None and not seen[0]:
                raise UserInputError(
                    f"output_dir {cfg.output_dir} is not shared: node {where} does not see it; on a multi-node "
                    "cluster set output_dir to a filesystem every node mounts at the same path, or a URI such as "
                    "s3://bucket/runs"
                )
            for path, ok in zip(paths[1 if marker is not None else 0 :], seen[1 if marker is not None else 0 :],
                                strict=True):  # fmt: skip
                if not ok:
                    raise UserInputError(
                        f"{path} does not exist on node {where}: the workers read it there; put it on storage "
                        "every node mounts at the same path"
                    )
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)
