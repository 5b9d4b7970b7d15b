"""Exceptions raised by safegene.

Every error says what is wrong *and* what to do about it; the CLI prints the message without a traceback.
"""


class SafegeneError(Exception):
    """Base class: a problem the user can fix (bad input, missing file, wrong model)."""


class ConfigError(SafegeneError):
    """An invalid configuration value."""


class DataError(SafegeneError):
    """A malformed, empty or missing data file or row."""


class ModelError(SafegeneError):
    """A model that cannot be found, assembled, verified or loaded."""


class FamilyMismatchError(ModelError):
    """An artifact built for one model family applied to another."""


class OutputExistsError(SafegeneError):
    """The output path already exists (safegene never overwrites without being told to)."""


class TrainingDivergedError(SafegeneError, FloatingPointError):
    """The training loss became non-finite (NaN or infinite): the run diverged.

    Also a FloatingPointError, so code that caught the earlier plain FloatingPointError keeps working."""
