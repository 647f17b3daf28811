"""The exception types of the commands: bad user input, and a run that failed.

Anything a user can fix (a missing file, a wrong shape, a bad flag) raises
:class:`UsageError` with a one-line message that names the problem and the
fix. Command-line programs print that line on stderr and exit non-zero
(see :func:`common.cli.run`); library users catch it like any ValueError.
"""


class UsageError(ValueError):
    """Bad input: the message says what is wrong and how to fix it."""


class DataError(UsageError):
    """A data set could not be found or read, or its content is unusable."""


class TrainingDiverged(RuntimeError):
    """A training step gave a NaN or infinite loss; training stopped without
    saving the broken weights (the last checkpoint on disk is from before)."""
