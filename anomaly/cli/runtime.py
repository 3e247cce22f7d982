"""What every entry point sets up for its job, and how it reports a user's error.

Process-wide settings (malloc, torch threads, log levels) are made here, by the entry points
only: library code never changes them. A user error (bad data, a bad config value, missing weights, a
bad model file: :class:`anomaly.errors.UserError`) prints as one short block and exits with status 1;
``HYDRA_FULL_ERROR=1`` shows the traceback instead. Any other exception is a bug and keeps its traceback.
Hydra creates the run folder before the job's code runs; :class:`CreateRunDir` creates it first, so that
a folder this user cannot create ends the same way.
"""

import errno
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from anomaly import distributed
from anomaly.allocator import keep_freed_memory_for_reuse
from anomaly.errors import FILE_SYSTEM_FIXES, user_error, user_message
from anomaly.watchdog import Watchdog

log = logging.getLogger(__name__)
T = TypeVar("T")
PEER_ENDED = (
    "another process of this run ended, and this one stops too: its error is above, or it was killed "
    "(kill -9, out of memory)"
)


def prepare_process(reuse_freed_memory: bool = True, num_threads: int | None = None) -> None:
    """Malloc settings, torch CPU threads and quiet third-party chatter, for one job of an entry point."""
    if reuse_freed_memory:
        keep_freed_memory_for_reuse()
    set_cpu_threads(num_threads)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is noise
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_drop_advertising)


def _drop_advertising(record: logging.LogRecord) -> bool:
    """Lightning's 'Tip: ... try installing litlogger' on every Trainer, and its note that a one-epoch
    fit stopped after its epoch."""
    message = record.getMessage()
    return "litlogger" not in message and not message.startswith("`Trainer.fit` stopped: `max_epochs=1`")


def set_cpu_threads(num_threads: int | None) -> None:
    """Torch's CPU threads for this job: ``num_threads``, or by default under ``hydra/launcher=joblib`` the
    cores split between its parallel jobs (each would otherwise start a thread per core)."""
    if num_threads is None:
        n_jobs = HydraConfig.get().launcher.get("n_jobs") if HydraConfig.initialized() else None
        if n_jobs is None:
            return
        cores = len(os.sched_getaffinity(0))
        parallel_jobs = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib's rule for n_jobs < 0
        num_threads = max(1, cores // parallel_jobs)
    torch.set_num_threads(num_threads)
    log.info("Torch CPU threads: %d", num_threads)


def report_user_errors(job: Callable[[], T], watchdog: Watchdog | None = None) -> T:
    """Runs ``job``; a user error becomes one block on stderr and exit status 1. In a distributed run one
    rank prints it: with a ``watchdog`` (ranks that torchrun or SLURM started) the first rank that failed,
    and the others stop; else rank 0, and the other ranks end quietly (every rank meets the same error, or
    sees rank 0 go). A rank whose collective failed because another rank ended says so in one line."""
    try:
        return job()
    except Exception as error:
        found, peer_ended = user_error(error), _peer_ended(error)
        if watchdog is not None:
            if peer_ended:
                watchdog.explain_peer_end()
            if not watchdog.fail():
                sys.exit(1)  # another rank failed first and printed its error
        elif peer_ended or (found is not None and not distributed.is_launching_process()):
            if distributed.is_launching_process():
                print(f"\nError: {PEER_ENDED}\n", file=sys.stderr, flush=True)
            sys.exit(1)
        if found is None or _full_error():
            raise
        exit_with_error(user_message(found))


def exit_with_error(message: str) -> NoReturn:
    """The one block a user's error ends with: ``Error: message`` on stderr, exit status 1."""
    print(f"\nError: {message}\n", file=sys.stderr, flush=True)
    sys.exit(1)


def _full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


_FOLDER_ERRORS = {*FILE_SYSTEM_FIXES, errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG}  # the user's to fix


class CreateRunDir(Callback):
    """Creates the run folder (``hydra.run.dir``; a sweep's ``hydra.sweep.dir``) before Hydra does: Hydra's
    own ``mkdir`` fails outside any job, as a traceback. A folder that cannot be created (no permission,
    read-only, full, a file in its way) is one block naming it and the setting that moves it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)  # the folder's name may use ${hydra:...}: as run_job does
        _create_folder(Path(OmegaConf.select(config, "hydra.run.dir")), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)
        _create_folder(Path(OmegaConf.select(config, "hydra.sweep.dir")), "hydra.sweep.dir")


def _create_folder(folder: Path, setting: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        if error.errno not in _FOLDER_ERRORS or _full_error():
            raise
        failed = f" ({error.filename})" if error.filename and Path(error.filename) != folder else ""
        exit_with_error(
            f"Cannot create the output folder {folder}{failed}: {error.strerror or error}. Give this user "
            f"write permission there (or free space), or write elsewhere: {setting}=<folder>."
        )


def backbone_weights_path(cfg: DictConfig) -> str | None:
    """``backbone.weights_path`` of a command that loads a model file (predict, update, export): this
    machine's file of its pretrained backbone's weights; null (or a config without it): the file's own."""
    return OmegaConf.select(cfg, "backbone.weights_path", default=None)


def _peer_ended(error: BaseException) -> bool:
    """A collective that failed because another process of the run ended (it reports its own error)."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        sign in text
        for sign in ("connection closed by peer", "connection reset", "broken pipe", "connection refused")
    )
