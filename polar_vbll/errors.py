"""Errors a user can act on, in two trees.

- :class:`UserInputError`: bad input from the user (a data file, a config, a model path, a checkpoint).
  Raised before or instead of any work; the message names the file, row and field.
- :class:`RunFailure`: something went wrong *while running* on valid input (a diverged loss, a head refit
  that went non-finite, replicas that drifted apart, a distributed run that failed for good). The message
  says what failed, where (step, refit, rank) and which settings to change; the last good checkpoint is
  left intact. No retry can fix it, so a Ray worker ends the run instead of letting Ray Train restart it.

The command line prints either kind as one line (``error: ...``) and exits with status 2: never a
traceback from deep inside.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input from the user: the message says what and where."""


class DataError(UserInputError):
    """A data file or row is malformed."""


class ConfigError(UserInputError):
    """A configuration value or file is invalid, or not supported by the entry point it was given to."""


class CheckpointError(UserInputError):
    """A checkpoint or adapter file is missing, truncated or altered."""


class ModelLoadError(UserInputError):
    """A model path does not exist or holds no loadable model."""


class RunFailure(RuntimeError):
    """A run-time failure on valid input that no retry can fix; the message says what, where and which
    settings to change."""


class TrainingDiverged(RunFailure):
    """The adapters' loss or a parameter group became non-finite (the theta-phase)."""


class HeadFitDiverged(RunFailure):
    """The head's refit (the eta-phase) produced a non-finite loss or an invalid posterior."""


class ReplicaDivergence(RunFailure):
    """Ranks hold different values of a tensor that must be replicated; the message names it."""
