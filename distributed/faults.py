"""Step hooks, and a fault injector for checking that a cluster really recovers.

A hook is any picklable callable ``hook(trainer, step) -> None`` (``trainer`` is the rank's
``polar_vbll.training.Trainer``) that the worker calls after every completed optimizer step, after
that step's checkpoint if one was due. Three fault injectors ship, for checking that a cluster really
recovers and that the replica check really fires, and one interruption:

- :class:`KillOnce` SIGKILLs one worker process, once per marker file: the run must resume from its last
  checkpoint and end exactly where an uninterrupted run ends;
- :class:`KillCoordinatorOnce` kills the head-coordinator actor: Ray restarts it and the run must resume
  from its last checkpoint and end exactly where an uninterrupted run ends;
- :class:`CorruptOnce` nudges one Stiefel factor on one rank: the next replica check must stop the run
  with an error naming that parameter;
- :class:`StopAfter` ends the run after a step as an interrupted run ends (a :class:`Interrupted` raised
  on every rank, no restart), leaving its checkpoints for a rerun to resume (in one process too).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from polar_vbll.errors import RunFailure


def _first_time(marker: str, note: str) -> bool:
    """Create ``marker`` atomically; False when it already exists (the fault already happened)."""
    try:
        fd = os.open(Path(marker), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, note.encode())
    os.close(fd)
    return True


@dataclass(frozen=True)
class KillOnce:
    """SIGKILL the process of rank ``rank`` right after step ``step``, the first time only: the marker
    file records that it happened (a restarted worker passes the same step again and must survive)."""

    rank: int
    step: int
    marker: str

    def __call__(self, trainer: Any, step: int) -> None:
        if trainer.backend.rank != self.rank or step != self.step:
            return
        if _first_time(self.marker, f"killed rank {self.rank} after step {step}, pid {os.getpid()}\n"):
            os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class KillCoordinatorOnce:
    """Kill the head-coordinator actor's process right after step ``step`` (rank 0 does it, the first time
    only): Ray restarts the actor empty and the run must continue from its last checkpoint."""

    step: int
    marker: str

    def __call__(self, trainer: Any, step: int) -> None:
        import ray

        if trainer.backend.rank != 0 or step != self.step:
            return
        if _first_time(self.marker, f"killed the coordinator after step {step}\n"):
            ray.kill(trainer.coordinator.handle, no_restart=False)


@dataclass(frozen=True)
class CorruptOnce:
    """Add ``delta`` to one entry of the first Stiefel factor group on rank ``rank`` after step ``step``
    (once per marker file): a replica that silently drifted."""

    rank: int
    step: int
    marker: str
    delta: float = 1e-6

    def __call__(self, trainer: Any, step: int) -> None:
        if trainer.backend.rank != self.rank or step != self.step:
            return
        if _first_time(self.marker, f"corrupted rank {self.rank} after step {step}\n"):
            with torch.no_grad():
                trainer.adapter.stiefel_parameters()[0].view(-1)[0] += self.delta


class Interrupted(RunFailure):
    """Raised by :class:`StopAfter`: the run was stopped on purpose."""


@dataclass(frozen=True)
class StopAfter:
    """Stop the run right after step ``step`` (after that step's checkpoint, if one was due) on every rank:
    a run interrupted there, which a rerun of the same name resumes (on any number of workers or in one
    process: docs/distributed.md, "Resuming on another number of workers")."""

    step: int

    def __call__(self, trainer: Any, step: int) -> None:
        if step == self.step:
            raise Interrupted(f"stopped after step {step} (distributed.faults.StopAfter)")
