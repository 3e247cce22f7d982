"""What every entry point sets up for its job, and how it reports a user's error.

Process-wide settings (malloc, torch threads, log levels) are made here, by the entry points
only: library code never changes them. A user error (bad data, a bad config value, missing weights, a
bad model file: :class:`anomaly.errors.UserError`) prints as one short block and exits with status 1;
``HYDRA_FULL_ERROR=1`` shows the traceback instead. Any other exception is a bug and keeps its traceback.
"""

import logging
import os
import sys
from collections.abc import Callable
from typing import TypeVar

import torch
from hydra.core.hydra_config import HydraConfig

from anomaly import distributed
from anomaly.allocator import keep_freed_memory_for_reuse
from anomaly.errors import user_error, user_message
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
        if found is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"\nError: {user_message(found)}\n", file=sys.stderr, flush=True)
        sys.exit(1)


def _peer_ended(error: BaseException) -> bool:
    """A collective that failed because another process of the run ended (it reports its own error)."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        sign in text
        for sign in ("connection closed by peer", "connection reset", "broken pipe", "connection refused")
    )
