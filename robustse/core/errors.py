"""Error types raised by the library.

The library never prints and never imports click: it raises a ``RobustseError``
subclass whose message is one line that names the problem. The CLI turns it into
``error: <message>`` on stderr and the exit code carried by the class
(2 for bad usage/spec/input, 1 for a failure of the run itself).
"""

from __future__ import annotations


class RobustseError(Exception):
    """Base class of every error robustse raises on purpose."""

    exit_code: int = 1


class UserError(RobustseError):
    """Bad usage, spec or input: the user can fix it (exit code 2)."""

    exit_code = 2


class SpecError(UserError):
    """A spec/config file or option is invalid (unknown key, wrong type, bad value)."""


class DataError(UserError):
    """A dataset is unknown, missing, malformed, or a subset is empty."""


class ModelError(UserError):
    """An architecture is unknown or its options are invalid."""


class InputMismatchError(DataError, ModelError):
    """A dataset's images do not fit a model (channels or size); also a ModelError for old callers."""


class CheckpointError(UserError):
    """A checkpoint is missing, corrupt, unsafe, or does not fit the model."""


class DeviceError(UserError):
    """The requested device is not available."""


class TrainingError(RobustseError):
    """Training failed (for example the loss became NaN)."""


class AttackError(UserError):
    """An attack, norm or attack option is unknown or out of range."""


class StoreError(UserError):
    """The results store is unreadable, corrupt or belongs to another run (exit code 2)."""


class WriteError(UserError):
    """A file or directory robustse was asked to write cannot be written safely (a symbolic link
    where a directory should be) or at all (read-only, full disk)."""
