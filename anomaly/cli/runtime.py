"""What every entry point sets up for its job, and how it reports a user's error.

Process-wide settings (malloc, torch threads, log levels, warnings) are made here, by the entry points
only: library code never changes them. A user error (bad data, a bad config value, missing weights, a
bad model file: :class:`anomaly.errors.UserError`) prints as one short block and exits with status 1;
``HYDRA_FULL_ERROR=1`` shows the traceback instead. Any other exception is a bug and keeps its traceback.
"""

import errno
import importlib.resources
import logging
import os
import sys
import warnings
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from anomaly import distributed
from anomaly.allocator import keep_freed_memory_for_reuse
from anomaly.errors import FileSystemError, UserError

log = logging.getLogger(__name__)
_ELSEWHERE = "or write the outputs elsewhere (hydra.run.dir=<folder>, paths.output_root=<folder>)"
FILE_SYSTEM_FIXES = {  # errno -> the fix; other OS errors are bugs or hardware and keep their traceback
    errno.EACCES: f"Give this user permission on it (read for inputs, write for outputs), {_ELSEWHERE}.",
    errno.EPERM: f"Give this user permission on it, {_ELSEWHERE}.",
    errno.EROFS: f"That file system is read-only: {_ELSEWHERE}.",
    errno.ENOSPC: f"The disk is full: free space there, {_ELSEWHERE}.",
    errno.EDQUOT: f"The disk quota is exhausted: free space there, {_ELSEWHERE}.",
}
CONFIG_PATH = "pkg://anomaly.configs"  # the configs/ folder, shipped in the package (setup.py)
T = TypeVar("T")


def config_dir() -> Path:
    """The folder of the shipped configs (the repo's configs/ in an editable install)."""
    return Path(str(importlib.resources.files("anomaly.configs")))


def sweep_id(default: str) -> str:
    """``${sweep_id:default}``: the sweep folder's name in a multirun (the wandb group that lines a sweep's
    runs up, see configs/logger/wandb.yaml), else ``default``."""
    hydra_config = HydraConfig.get()
    return Path(hydra_config.sweep.dir).name if hydra_config.mode == RunMode.MULTIRUN else default


def data_name(cfg: DictConfig) -> str:
    """What a run's data is called in folder names, wandb and result tables: the category, else the data
    folder's name, else the data set config's (``${data_name:}`` in the configs)."""
    dataset = cfg.get("dataset") or {}
    if dataset.get("category"):
        return str(dataset.category)
    if "root" in dataset and not OmegaConf.is_missing(dataset, "root") and dataset.root:
        return Path(str(dataset.root)).name
    return HydraConfig.get().runtime.choices.get("dataset", "data") if HydraConfig.initialized() else "data"


def run_stamp() -> str:
    """``${run_stamp:}``: the start time to the microsecond and the process id, the default run and sweep
    folder names: sorted by time, and never the same folder for two runs started in the same second."""
    return f"{datetime.now():%Y-%m-%d_%H-%M-%S-%f}_{os.getpid()}"


def register_resolvers() -> None:
    """The config resolvers the shipped configs use."""
    OmegaConf.register_new_resolver("sweep_id", sweep_id, replace=True)
    OmegaConf.register_new_resolver("data_name", lambda *, _root_: data_name(_root_), replace=True)
    # cached: the run dir and the sweep dir are resolved more than once, and must stay one folder
    OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True, replace=True)


def prepare_process(reuse_freed_memory: bool = True, num_threads: int | None = None) -> None:
    """Malloc settings, torch CPU threads and quiet third-party chatter, for one job of an entry point."""
    if reuse_freed_memory:
        keep_freed_memory_for_reuse()
    set_cpu_threads(num_threads)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is noise
    # The backbone is frozen in eval mode on purpose (BatchNorm statistics and dropout belong to the
    # pretrained network); Lightning warns about any module in eval mode at the start of fitting.
    warnings.filterwarnings(
        "ignore", message=r"Found \d+ module\(s\) in eval mode", module="pytorch_lightning"
    )
    # pytorch-lightning 2.6's data-loader flattening calls a torch.utils._pytree API that torch 2.10+
    # deprecates; harmless, and not ours to change.
    warnings.filterwarnings(
        "ignore", message=r".*isinstance\(treespec, LeafSpec\)", module="pytorch_lightning"
    )
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


def report_user_errors(job: Callable[[], T]) -> T:
    """Runs ``job``; a user error becomes one block on stderr and exit status 1. In a distributed run rank 0
    prints it and the other ranks end quietly (every rank meets the same error, or sees rank 0 go)."""
    try:
        return job()
    except Exception as error:
        found = user_error(error)
        if not distributed.is_launching_process() and (found is not None or _peer_ended(error)):
            sys.exit(1)
        if found is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"\nError: {user_message(found)}\n", file=sys.stderr, flush=True)
        sys.exit(1)


def _peer_ended(error: BaseException) -> bool:
    """A collective that failed because another process of the run ended (it reports its own error)."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        sign in text for sign in ("connection closed by peer", "connection reset", "broken pipe")
    )
