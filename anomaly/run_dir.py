"""A run's folder: held by one run at a time, its record (``run.json``) and its row in the results database.

A finished run's folder is never overwritten by accident: a rerun of the identical config is skipped,
another config is refused (``force=true`` redoes either). A failure leaves its record, ``error.log`` and
a database row, so that a sweep's report lists it.
"""

import fcntl
import logging
import sqlite3
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from anomaly.config import data_name
from anomaly.errors import ConfigError, describe_user_error
from anomaly.reports.database import append_run
from anomaly.reports.records import RunRecord

log = logging.getLogger(__name__)
TABLE_AXES = ("method", "backbone", "dataset", "dataset.category", "seed")  # never part of a variant
LOCK_FILE = ".anomaly-train.lock"  # in the run dir, locked by the run writing there (hold_run_dir)


class RunDirTaken(ConfigError):
    """The run dir is another run's (its results, or a run writing there now): refused, nothing written."""


@contextmanager
def hold_run_dir(output_dir: Path) -> Iterator[None]:
    """An OS lock on ``output_dir`` while the run writes there: a second run in the same folder at the
    same time is refused, while a folder a killed run left "running" (the lock went with its process)
    is free to redo."""
    output_dir.mkdir(parents=True, exist_ok=True)
    with (output_dir / LOCK_FILE).open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirTaken(
                f"Another anomaly-train is writing into {output_dir} now: wait for it to end, or choose "
                "another folder (hydra.run.dir=<folder>; by default every run gets a new one)."
            ) from None
        yield


def finished_run(output_dir: Path, config_text: str) -> RunRecord | None:
    """The record of an earlier successful run in ``output_dir`` with the identical resolved config."""
    config, record = output_dir / "config.yaml", RunRecord.read(output_dir)
    if record is None or record.status != "ok" or not config.is_file() or config.read_text() != config_text:
        return None
    return record


def refuse_other_results(output_dir: Path) -> None:
    """Raises :class:`RunDirTaken` where ``output_dir`` holds a successful run (of another config, once
    :func:`finished_run` found none): an explicit or reused folder never loses results by accident."""
    record = RunRecord.read(output_dir)
    if record is not None and record.status == "ok":
        raise RunDirTaken(
            f"{output_dir} already holds the results of a run with another config (its config.yaml): "
            "choose another folder (hydra.run.dir=<folder>, or hydra.sweep.dir for a sweep; by default "
            "every run gets a new one), or add force=true to overwrite them."
        )


def start_run(output_dir: Path, config_text: str, record: RunRecord) -> None:
    """Clears an earlier run's results and marks the folder "running" (a job killed outright stays so)."""
    for stale in ("metrics.json", "error.log"):
        (output_dir / stale).unlink(missing_ok=True)
    (output_dir / "config.yaml").write_text(config_text)
    record.write(output_dir)


def run_record(
    cfg: DictConfig, status: str, run_id: str, metrics: dict | None = None, error: str | None = None
) -> RunRecord:
    """What identifies the run, from its config (the same whether it succeeded or failed)."""
    choices, overrides, excluded = {}, [], set()
    if HydraConfig.initialized():
        hydra_config = HydraConfig.get()
        choices, overrides = hydra_config.runtime.choices, list(hydra_config.overrides.task)
        excluded = set(hydra_config.job.config.override_dirname.exclude_keys)
    variant = [item for item in overrides if not _is_axis_or_excluded(item.split("=", 1)[0], excluded)]
    model = cfg.method.get("model") or {}
    logger = (cfg.get("logger") or {}).get("wandb")
    return RunRecord(
        method=cfg.method.name,
        backbone=cfg.backbone.name if "features" in model or "backbone" in model else None,
        dataset=choices.get("dataset") or "",
        category=data_name(cfg),
        seed=cfg.seed,
        status=status,
        variant=variant,
        metrics=metrics or {},
        error=error,
        wandb={"project": logger.project, "offline": logger.offline} if logger else None,
        run_id=run_id,
    )


def _is_axis_or_excluded(key: str, excluded: set[str]) -> bool:
    """Table axes, settings that do not change results, and Hydra's or the loggers' own settings."""
    key = key.lstrip("+~")
    return key in TABLE_AXES or key in excluded or key.startswith(("hydra.", "logger."))


def record_failure(cfg: DictConfig, error: BaseException, run_id: str) -> None:
    """The failed run's record (its error in one line) and ``error.log`` with the traceback."""
    output_dir = Path(cfg.paths.output_dir)
    text = describe_user_error(error) or "".join(traceback.format_exception_only(error)).strip()
    try:
        record = run_record(cfg, "failed", run_id, error=text)
    except Exception:  # the config itself does not resolve: name the run by its config choices
        choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
        record = RunRecord(choices.get("method", "?"), None, choices.get("dataset", ""), "?",
                           cfg.get("seed", 0), "failed", error=text, run_id=run_id)  # fmt: skip
    record.write(output_dir)
    (output_dir / "error.log").write_text("".join(traceback.format_exception(error)))
    add_to_results_db(cfg, record, output_dir)


def add_to_results_db(cfg: DictConfig, record: RunRecord, output_dir: Path) -> None:
    """Appends the run to ``paths.results_db``; a database problem is logged, never fails the run."""
    database = (cfg.get("paths") or {}).get("results_db")
    if not database:
        return
    try:
        append_run(Path(database), record, output_dir)
    except sqlite3.Error as error:
        log.warning("Could not add the run to the results database %s (%s); its run.json is complete.",
                    database, error)  # fmt: skip
