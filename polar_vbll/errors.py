"""Errors a user can act on.

Anything raised because of bad user input (a data file, a config, a model path, a checkpoint) is a
``UserInputError``: the CLI prints its message alone, without a traceback, and exits with status 2.
Messages must name the file, row and field where they apply.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input from the user: the message says what and where."""


class DataError(UserInputError):
    """A data file or row is malformed."""


class ConfigError(UserInputError):
    """A configuration value or file is invalid."""


class CheckpointError(UserInputError):
    """A checkpoint or adapter file is missing, truncated or altered."""


class ModelLoadError(UserInputError):
    """A model path does not exist or holds no loadable model."""
