"""Errors a user can fix: bad data, a bad config value, missing weights, a bad model file.

Each message names what and where, and the fix. The entry points print them as one short block and
exit non-zero (the traceback only with ``HYDRA_FULL_ERROR=1``); anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """Base of the errors whose message is the whole story."""


class ConfigError(UserError, ValueError):
    """A config value out of range or of the wrong kind; raised when the object is built."""


class DataError(UserError, RuntimeError):
    """Missing, unreadable or inconsistent data; the message names the file and the fix."""


class ModelFileError(UserError, ValueError):
    """A model file that is not one this version of anomaly wrote, or that is damaged."""


class FileSystemError(UserError, OSError):
    """A file or folder that this user cannot read or write, a read-only file system, a full disk."""
