"""The errors a user can act on: the CLI prints their message on one line and exits non-zero."""


class UserError(ValueError):
    """Bad input (a file, a setting, a dataset): the message names the thing and the problem."""


class DataError(UserError):
    """A dataset, manifest or split that does not match what the stage expects."""


class CheckpointError(UserError):
    """A checkpoint or weights file that is missing, unreadable or does not fit the model."""


class Interrupted(Exception):
    """A stage stopped early by a signal after saving its state; the CLI exits with 128 + the signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = int(signum)
