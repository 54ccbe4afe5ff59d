"""User-facing errors: one line that names the problem and the fix.

The CLI prints ``attnlab: error: <message>`` and exits with ``exit_code``;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user. The message must say what is wrong and how to fix it."""

    exit_code = 2


class ConfigError(UserError):
    """A config key or value is invalid."""


class DataError(UserError):
    """A data source or prepared dataset is missing, empty or corrupted."""

    exit_code = 3


class CheckpointError(UserError):
    """A checkpoint or run directory cannot be used as asked."""

    exit_code = 4


class TrainingDiverged(UserError):
    """The loss became non-finite; the last good checkpoint is kept."""

    exit_code = 5


class InUse(UserError):
    """Another process holds the lock on a run directory, dataset or sweep folder."""

    exit_code = 6


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, with a message saying what was kept (the CLI prints it and exits 130)."""
