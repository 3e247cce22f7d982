"""A run's folder: held by one run at a time, its record (``run.json``) and its row in the results database.

A finished run's folder is never overwritten by accident: a rerun of the same config is skipped,
another config is refused naming what differs (``force=true`` redoes either). "The same" is the same
results: where the files are (a moved or copied sweep folder), how the run reports, and for fit-once
methods how many processes run it, are not compared (:func:`results_identity`). A failure leaves its
record, ``error.log`` and a database row, so that a sweep's report lists it.
"""

import fcntl
import logging
import sqlite3
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class
from omegaconf import DictConfig

from anomaly.config import data_name, protocol
from anomaly.errors import ConfigError, describe_user_error
from anomaly.methods.base import FitOnceModel
from anomaly.reports.database import append_run
from anomaly.reports.records import RunRecord

log = logging.getLogger(__name__)
# never part of a variant: the tables' rows and columns, and what they average over (seeds, draws)
TABLE_AXES = (
    "method",
    "backbone",
    "dataset",
    "dataset.category",
    "seed",
    "dataset.shots",
    "dataset.shot_draw",
)
LOCK_FILE = ".anomaly-train.lock"  # in the run dir, locked by the run writing there (hold_run_dir)
NOT_RESULTS = (  # where a run's files are and how it reports: never part of what it computes
    "paths", "logger", "force", "num_threads", "reuse_freed_memory", "optimized_metric",
    "dataset.num_workers", "trainer.default_root_dir", "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
)  # fmt: skip
# how many processes run it: a fit-once method fits exactly what one process fits (configs/trainer/ddp.yaml);
# a trained one trains data-parallel, other batches, other results
PROCESS_LAYOUT = ("trainer.devices", "trainer.num_nodes", "trainer.strategy")


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


def results_identity(config_text: str) -> dict:
    """The resolved config (YAML) less :data:`NOT_RESULTS`, and less :data:`PROCESS_LAYOUT` for a fit-once
    method: two configs with the same identity compute the same results."""
    config = yaml.safe_load(config_text) or {}
    target = ((config.get("method") or {}).get("model") or {}).get("_target_")
    try:
        fits_once = target is not None and issubclass(get_class(target), FitOnceModel)
    except (ImportError, ValueError):  # a class this version does not know: compare its layout too
        fits_once = False
    for key in (*NOT_RESULTS, *(PROCESS_LAYOUT if fits_once else ())):
        *parents, name = key.split(".")
        node = config
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(name, None)
    return config


def finished_run(output_dir: Path, config_text: str) -> RunRecord | None:
    """The record of an earlier successful run in ``output_dir`` whose config has the same results
    (:func:`results_identity`) as ``config_text``."""
    config, record = output_dir / "config.yaml", RunRecord.read(output_dir)
    if record is None or record.status != "ok" or not config.is_file():
        return None
    return record if results_identity(config.read_text()) == results_identity(config_text) else None


def refuse_other_results(output_dir: Path, config_text: str) -> None:
    """Raises :class:`RunDirTaken` where ``output_dir`` holds a successful run (of another config, once
    :func:`finished_run` found none), naming the settings that differ: an explicit or reused folder never
    loses results by accident."""
    record = RunRecord.read(output_dir)
    if record is None or record.status != "ok":
        return
    config = output_dir / "config.yaml"
    differing = (
        _differences(results_identity(config.read_text()), results_identity(config_text))
        if config.is_file() else []
    )  # fmt: skip
    if differing and all(key.startswith(PROCESS_LAYOUT) for key in differing):
        what = (f"another config: it differs only in how many processes run it ({', '.join(differing)}), "
                "and this method trains data-parallel, so its results would differ")  # fmt: skip
    elif differing:
        shown = ", ".join(differing[:6]) + (f" and {len(differing) - 6} more" if len(differing) > 6 else "")
        what = f"another config (its config.yaml differs in {shown})"
    else:
        what = "another config (its config.yaml)"
    raise RunDirTaken(
        f"{output_dir} already holds the results of a run with {what}: choose another folder "
        "(hydra.run.dir=<folder>, or hydra.sweep.dir for a sweep; by default every run gets a new one), "
        "or add force=true to overwrite them."
    )


def _differences(old: object, new: object, path: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested mappings."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [path or "(the whole config)"]
    keys = sorted(set(old) | set(new), key=str)
    return [
        found
        for key in keys
        for found in _differences(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
    ]


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
    shots = (cfg.get("dataset") or {}).get("shots")
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
        shots=shots,
        shot_draw=None if shots is None else cfg.dataset.get("shot_draw", 0),
        run_id=run_id,
        protocol=protocol(cfg),
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
