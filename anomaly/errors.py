"""Errors a user can fix: bad data, a bad config value, missing weights or packages, a bad model file.

Each message names what and where, and the fix. The entry points print them as one short block and
exit non-zero (the traceback only with ``HYDRA_FULL_ERROR=1``); anything else is a bug and keeps its
traceback. Each class also subclasses the built-in type such code raised before, so that an ``except
ValueError`` (or ``ImportError``, ...) around it still holds.
"""

import errno
import importlib
from types import ModuleType


class UserError(Exception):
    """Base of the errors whose message is the whole story."""


class ConfigError(UserError, ValueError):
    """A config value out of range or of the wrong kind (an unknown backbone, layer or weights name
    included); raised when the object is built."""


class DataError(UserError, RuntimeError):
    """Missing, unreadable or inconsistent data; the message names the file and the fix."""


class UndefinedMetricError(DataError, ValueError):
    """A test set that a metric is undefined on: one class only, or masks that mark no pixel or every one."""


class ModelFileError(UserError, ValueError):
    """A model file that is not one this version of anomaly wrote, or that is damaged."""


class FileSystemError(UserError, OSError):
    """A file or folder that this user cannot read or write, a read-only file system, a full disk."""


class OccupiedFolderError(UserError, FileExistsError):
    """A folder that anomaly would write into holds files it did not write, which it will not replace."""


class BackboneWeightsError(UserError, RuntimeError):
    """Backbone weights that could not be obtained, or that do not fit the architecture."""


class MissingPackageError(UserError, ImportError):
    """A package that one feature needs does not import here; the message names the ``pip install``."""


class ParityError(UserError, RuntimeError):
    """An exported model whose outputs differ from the eager model's beyond the tolerance."""


class DistributedStateError(UserError, RuntimeError):
    """The processes of a distributed run ended a fit with different models (a method that ignores the
    collective it is given); the message names the tensors."""


def require(module: str, pip_name: str, purpose: str, alternative: str | None = None) -> ModuleType:
    """``import module``, else a :class:`MissingPackageError` naming ``purpose`` (what needs it), the
    ``pip install`` that fixes it and ``alternative`` (a setting that does without it), if any. Packages
    that only some features need are imported where they are used, through this."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        instead = f", or {alternative}" if alternative else ""
        raise MissingPackageError(
            f"{purpose} needs the Python package {pip_name}, which does not import here ({error}). "
            f"Install it into this environment: pip install {pip_name}{instead}."
        ) from error


_ELSEWHERE = (  # hydra.run.dir does not follow paths.output_root: each moves its own files
    "or write elsewhere (the run's files: hydra.run.dir=<folder>, a sweep's hydra.sweep.dir=<folder>; "
    "generated data and the results database: paths.output_root=<folder>)"
)
FILE_SYSTEM_FIXES = {  # errno -> the fix; other OS errors are bugs or hardware and keep their traceback
    errno.EACCES: f"Give this user permission on it (read for inputs, write for outputs), {_ELSEWHERE}.",
    errno.EPERM: f"Give this user permission on it, {_ELSEWHERE}.",
    errno.EROFS: f"That file system is read-only: {_ELSEWHERE}.",
    errno.ENOSPC: f"The disk is full: free space there, {_ELSEWHERE}.",
    errno.EDQUOT: f"The disk quota is exhausted: free space there, {_ELSEWHERE}.",
}


def user_error(error: BaseException) -> UserError | None:
    """The user error behind ``error`` (through Hydra's instantiation and chained exceptions), if any: an
    :class:`UserError`, or a file-system error the user fixes (permission, read-only, full disk)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        if isinstance(error, OSError) and error.errno in FILE_SYSTEM_FIXES:
            return FileSystemError(file_system_message(error))
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def file_system_message(error: OSError) -> str:
    """What failed on which file, and the fix for that errno."""
    where = f" {error.filename}" if error.filename else ""
    return f"Cannot use{where}: {error.strerror or error}. {FILE_SYSTEM_FIXES[error.errno]}"


def user_message(error: UserError) -> str:
    """The error's own text; one raised in a DataLoader worker comes wrapped in the worker's traceback."""
    text = str(error)
    if "Original Traceback" in text:  # torch re-raises a worker's exception with its traceback as text
        text = text.rsplit(f"{type(error).__name__}: ", 1)[-1].strip()
    return text


def describe_user_error(error: BaseException) -> str | None:
    """The one-block message of the user error behind ``error``; None when it is not a user's to fix."""
    found = user_error(error)
    return None if found is None else user_message(found)
