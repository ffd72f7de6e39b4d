"""The error a user can act on: the CLI prints its message on one line and exits non-zero."""


class UserError(ValueError):
    """Bad input (a file, a setting, a dataset): the message names the thing and the problem."""


class DataError(UserError):
    """A dataset, manifest or split that does not match what the stage expects."""


class CheckpointError(UserError):
    """A checkpoint or weights file that is missing, unreadable or does not fit the model."""
