"""The one-process backend and checkpoint store of the trainer.

:class:`LocalBackend` runs the per-step math in this process (features through a ``FeatureSource``, a
plain ``backward``, AdamW with optional clipping for the Euclidean parameters): every collective of the
:class:`~polar_vbll.protocols.Backend` protocol is the identity over one rank. :class:`LocalCheckpoints`
writes ``checkpoint-<step>`` folders into the run folder and prunes old ones; it resumes from the newest
checkpoint of the run folder, whichever entry point wrote it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polar_vbll.checkpoint import (
    clear_run_checkpoints,
    load_checkpoint,
    newest_intact,
    prune_checkpoints,
    run_checkpoints,
    save_checkpoint,
)
from polar_vbll.config import OptimConfig
from polar_vbll.features import EncodedSplit, FeatureSource
from polar_vbll.training.optimizers import build_theta_optimizer
from polar_vbll.training.schedule import batch_indices


class LocalBackend:
    """One process, one rank, on the backbone's device. ``theta_params``: the Euclidean adapter parameters
    (Theta, or LoRA's A, B), stepped by AdamW built from ``optim`` (fused on CUDA; clipped to
    ``optim.max_grad_norm`` when set). ``sync_every_step``: on the CPU the trainer checks every step's loss
    before anything moves (a sync costs nothing there); on an accelerator it checks at logging steps, so
    the host never waits for the device inside a step (``Trainer.train_step``)."""

    rank = 0
    world = 1
    sync_check_every = 0

    def __init__(self, source: FeatureSource, theta_params: Sequence[nn.Parameter], optim: OptimConfig) -> None:
        self.source = source
        self.theta_params = list(theta_params)
        self.theta_optimizer = build_theta_optimizer(self.theta_params, optim)
        self.max_grad_norm = optim.max_grad_norm
        self.sync_every_step = source.device.type == "cpu"

    @property
    def model(self) -> nn.Module:
        return self.source.model

    # -------------------------------------------------------------------------------------- features
    def prepare(self, enc: EncodedSplit, batch_size: int, progress: bool = False) -> None:
        self.source.prepare(enc, batch_size, progress=progress)

    def features(self, enc: EncodedSplit, idx: Sequence[int]) -> torch.Tensor:
        return self.source.features(enc, list(idx))

    def split_features(self, enc: EncodedSplit, batch_size: int, progress: bool = False) -> torch.Tensor:
        return self.source.split_features(enc, batch_size, progress)

    def shard(self, n: int) -> tuple[int, int]:
        return 0, n

    def shard_features(self, enc: EncodedSplit, batch_size: int) -> torch.Tensor:
        return self.source.split_features(enc, batch_size)

    # ------------------------------------------------------------------------------------------ steps
    def step_batches(self, step: int, n: int, batch_size: int, seed: int) -> list[list[int]]:
        return [batch_indices(step, n, batch_size, seed)]

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        return value.detach().to(torch.float64)

    def reduce_gradients(self, params: Sequence[nn.Parameter]) -> None:
        return None

    def set_theta_lr(self, lr: float) -> None:
        for g in self.theta_optimizer.param_groups:
            g["lr"] = lr

    def theta_step(self) -> None:
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.theta_params, self.max_grad_norm)
        self.theta_optimizer.step()
        self.theta_optimizer.zero_grad(set_to_none=True)

    def theta_state_dict(self) -> dict[str, Any]:
        # a copy: torch's state_dict aliases the live moments, which later steps update in place
        return copy.deepcopy(self.theta_optimizer.state_dict())

    def load_theta_state_dict(self, state: dict[str, Any]) -> None:
        self.theta_optimizer.load_state_dict(state)

    # ------------------------------------------------------------------------------------ collectives
    @contextlib.contextmanager
    def gathered(self, params: Sequence[nn.Parameter]) -> Iterator[None]:
        yield

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def verify(self, named: dict[str, torch.Tensor], where: str) -> str | None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"kind": "local", "world_size": 1, "device": str(self.source.device)}


class LocalCheckpoints:
    """``<run_dir>/checkpoint-<step>`` folders (safetensors + JSON, atomic), the newest ``keep`` kept."""

    def __init__(self, run_dir: str | Path, keep: int) -> None:
        self.run_dir = Path(run_dir)
        self.keep = keep

    def latest(self) -> dict[str, Any] | None:
        """The newest intact checkpoint of the run folder, this store's or the workers' (``checkpoint_*``:
        a run resumes in one process where N workers stopped; :func:`polar_vbll.checkpoint.run_checkpoints`);
        a damaged newer one is skipped with a warning naming it (an interrupted copy or a full disk must not
        block a resume that an older checkpoint can serve)."""
        return newest_intact(run_checkpoints(self.run_dir), load_checkpoint)

    def clear(self) -> int:
        """Remove every checkpoint of the run folder, the workers' too (a fresh start); returns how many
        there were."""
        return clear_run_checkpoints(self.run_dir)

    def save(self, step: int, state: dict[str, Any] | None, metrics: dict[str, Any]) -> None:
        if state is not None:
            save_checkpoint(self.run_dir / f"checkpoint-{step}", state)
            prune_checkpoints(self.run_dir, self.keep)

    def report(self, metrics: dict[str, Any]) -> None:
        return None

    def save_final(
        self, step: int, state: dict[str, Any] | None, metrics: dict[str, Any], artifacts: Path | None
    ) -> None:
        """The final checkpoint (unless the trainer already wrote this step's), then the staged artifacts
        moved into the run folder, replacing older files of the same names."""
        if state is not None and not (self.run_dir / f"checkpoint-{step}").is_dir():
            self.save(step, state, metrics)
        if artifacts is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for src in sorted(artifacts.iterdir()):
            dst = self.run_dir / src.name
            if dst.is_dir():
                if src.is_dir() and src.name.startswith("member-"):  # an ensemble member's own folder
                    for inner in src.iterdir():
                        _replace(inner, dst / inner.name)
                    continue
                shutil.rmtree(dst)
            _replace(src, dst)


def _replace(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst`` so that a failure (a full disk while copying) leaves ``dst`` as it was: moved in
    under a temporary name first, then renamed over ``dst`` (a folder: the old one renamed aside, then
    removed)."""
    incoming = dst.with_name(dst.name + ".incoming")
    _remove(incoming)
    try:
        shutil.move(str(src), str(incoming))
    except BaseException:
        _remove(incoming)
        raise
    if dst.is_dir():
        old = dst.with_name(dst.name + ".old")
        _remove(old)
        os.replace(dst, old)
        os.replace(incoming, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(incoming, dst)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
