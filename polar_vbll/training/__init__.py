"""Training: one loop (``trainer``) over a backend (``local`` in one process; ``distributed.backend`` on
Ray Train workers), the schedule as pure functions (``schedule``) and the eta-phase (``coordinator``)."""

from polar_vbll.errors import HeadFitDiverged, TrainingDiverged
from polar_vbll.training.coordinator import HeadCoordinator, LocalCoordinator
from polar_vbll.training.local import LocalBackend, LocalCheckpoints
from polar_vbll.training.optimizers import build_optimizers, build_stiefel_optimizer, build_theta_optimizer
from polar_vbll.training.schedule import (
    batch_indices,
    check_resumable,
    final_refit_due,
    head_refit_due,
    lr_factor,
)
from polar_vbll.training.trainer import Trainer, TrainState, check_same_data, load_weights

__all__ = [
    "HeadCoordinator",
    "HeadFitDiverged",
    "LocalBackend",
    "LocalCheckpoints",
    "LocalCoordinator",
    "TrainState",
    "Trainer",
    "TrainingDiverged",
    "batch_indices",
    "build_optimizers",
    "build_stiefel_optimizer",
    "build_theta_optimizer",
    "check_resumable",
    "check_same_data",
    "final_refit_due",
    "head_refit_due",
    "load_weights",
    "lr_factor",
]
