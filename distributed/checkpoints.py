"""Checkpoints through Ray Train's storage: rank 0 writes, every rank reports (``ray.train.report``), so a
search scheduler sees each rank-0 report and Ray Train keeps the newest ``num_to_keep`` checkpoints. A
(re)started worker group resumes from the newest checkpoint of the run folder, one process's
``checkpoint-<step>`` included (:func:`polar_vbll.checkpoint.run_checkpoints`), or, in storage behind a
URI, from what ``ray.train.get_checkpoint()`` hands it.

A checkpoint directory holds ``state/`` (``polar_vbll.checkpoint``'s format: safetensors + JSON, never a
pickle) and, for the final one, ``artifacts/`` (adapter, head, predictions, ``results.json``), which the
driver copies into the run folder.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from polar_vbll.checkpoint import load_checkpoint, newest_intact, run_checkpoints, save_checkpoint


def siblings(checkpoint) -> list[Any]:
    """``checkpoint`` and the other ``checkpoint_*`` directories of its run in its storage (local or not,
    through the checkpoint's own filesystem), oldest first, ``checkpoint`` last."""
    import posixpath

    import pyarrow.fs
    import ray.train

    fs, path = checkpoint.filesystem, checkpoint.path
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(posixpath.dirname(path)))
    except OSError:
        return [checkpoint]
    older = sorted(i.path for i in infos if i.type == pyarrow.fs.FileType.Directory
                   and posixpath.basename(i.path).startswith("checkpoint_") and i.path < path)  # fmt: skip
    return [ray.train.Checkpoint(p, filesystem=fs) for p in older] + [checkpoint]


def _load_state(checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as d:
        return load_checkpoint(Path(d) / "state")


class RayCheckpoints:
    """The :class:`~polar_vbll.protocols.CheckpointStore` of a Ray Train worker of rank ``rank``.
    ``run_dir``: the run folder when the storage is a local (or mounted) path, None for a URI."""

    def __init__(self, rank: int, run_dir: str | Path | None = None) -> None:
        self.rank = rank
        self.run_dir = Path(run_dir) if run_dir is not None else None

    def latest(self) -> dict[str, Any] | None:
        """The state to resume. In a run folder on a path: its newest intact checkpoint, whichever entry
        point and number of workers wrote it (:func:`polar_vbll.checkpoint.run_checkpoints`, the rule one
        process follows too). In storage behind a URI: the checkpoint Ray Train hands this group, or, when
        that one is damaged (truncated, edited), the newest intact older one in the same storage. A damaged
        newer one is skipped with a warning (:func:`polar_vbll.checkpoint.newest_intact`). Every rank reads
        the same, in the same order."""
        import ray.train

        if self.run_dir is not None:
            return newest_intact(run_checkpoints(self.run_dir), load_checkpoint)
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        return newest_intact(siblings(checkpoint), _load_state)

    def report(self, metrics: dict[str, Any]) -> None:
        import ray.train

        ray.train.report(metrics)

    def save(self, step: int, state: dict[str, Any] | None, metrics: dict[str, Any]) -> None:
        self.save_final(step, state, metrics, None)

    def save_final(
        self, step: int, state: dict[str, Any] | None, metrics: dict[str, Any], artifacts: Path | None
    ) -> None:
        import ray.train

        if self.rank != 0 or state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="polar-vbll-ckpt-") as tmp:
            save_checkpoint(Path(tmp) / "state", state)
            if artifacts is not None:
                shutil.copytree(artifacts, Path(tmp) / "artifacts")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
