"""User-facing errors.

The engine raises these; ``dpd_cli.cli.errors.handle_errors`` turns them into a one-paragraph
message on stderr and exit code 2. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

#: Exit codes of the ``dpd`` command (also documented in docs/guide.md).
EXIT_USER_ERROR = 2
EXIT_BELOW_THRESHOLD = 3  # ``dpd evaluate --fail-under`` and the mean accuracy was lower
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """Something the user can fix: the message says what is wrong and how to fix it."""

    #: Whether the traceback (``DPD_DEBUG=1``) can tell more than the message: not for a bad invocation.
    has_traceback: bool = True


class SettingsError(UserError):
    """Invalid flags, environment variables or config file."""

    has_traceback = False  # raised where the value is checked: the message is the whole story


class DataError(UserError):
    """A dataset is unknown, missing or unusable for the request."""


class ExpertsError(UserError):
    """No experts, or experts that do not fit the settings."""


class StorageError(UserError):
    """A file is missing, corrupted, foreign, or cannot be written."""


class DamagedError(StorageError):
    """A file's bytes are not those that were written (cut short, changed on disk); ``reason`` says how in a few
    words (``"truncated"``, ``"checksum mismatch"``)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class OutputExistsError(UserError):
    """An output already exists and neither ``--force`` nor ``--resume`` was given."""


class DeviceError(UserError):
    """The requested device is not available."""


class DivergedError(UserError):
    """Distillation produced a NaN/Inf loss or a non-positive learning rate."""
