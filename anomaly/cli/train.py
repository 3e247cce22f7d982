"""``anomaly-train``: fit a method on normal images, calibrate, score the test set, write the run dir.

Builds data, model, Lightning module, loggers and trainer from the Hydra config; checks every data file;
fits; calibrates the decision threshold on normal held-out images; saves the model; tests; writes
``run.json``, ``metrics.json``, ``config.yaml``, ``model.safetensors`` and heatmaps. Returns the metric
named by ``optimized_metric`` so that Hydra sweepers can optimise it. (Over 300 lines because it is the
one place where a run's steps meet; each step is a function of its own, in the order they run.)
"""

import fcntl
import json
import logging
import resource
import sqlite3
import sys
import time
import traceback
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, WandbLogger  # ours (configs/logger/wandb.yaml) is one too

from anomaly import distributed
from anomaly.calibration import Calibration, check_budgets, fit_calibration
from anomaly.cli.runtime import (
    CONFIG_PATH,
    data_name,
    prepare_process,
    report_user_errors,
    user_error,
    user_message,
)
from anomaly.data.datamodule import AnomalyDataModule
from anomaly.data.preprocessing import Preprocessing
from anomaly.errors import ConfigError
from anomaly.methods.base import AnomalyModel, FitOnceModel, check_finite, non_finite_error
from anomaly.methods.lightning import AnomalyModule, DDPStrategy
from anomaly.methods.tiling import Tiling, tile_model
from anomaly.model_io import save_model
from anomaly.reports.database import append_run
from anomaly.reports.records import RunRecord
from anomaly.visualization import save_heatmaps

log = logging.getLogger(__name__)
MAX_SEED = 2**32 - 1  # numpy's seeds
TABLE_AXES = ("method", "backbone", "dataset", "dataset.category", "seed")  # never part of a variant
LOCK_FILE = ".anomaly-train.lock"  # in the run dir, locked by the run writing there (hold_run_dir)


class RunDirTaken(ConfigError):
    """The run dir is another run's (its results, or a run writing there now): refused, nothing written."""


def train(cfg: DictConfig) -> dict[str, float]:
    """Runs one experiment; returns its metrics (also in ``<output_dir>/metrics.json`` and ``run.json``).

    The run holds its dir until its record is written (:func:`hold_run_dir`). A failure is recorded there
    (``run.json``, ``error.log``, the results database) and raised; a dir that is another run's is refused
    with :class:`RunDirTaken` before anything is written, so that the other run's files stay its own.
    """
    output_dir = Path(cfg.paths.output_dir)
    run_id = uuid.uuid4().hex  # the run's row in the results database, whatever else ran in its folder
    if not distributed.is_launching_process():  # a further rank of a distributed run: rank 0 writes
        return fit_and_test(cfg, output_dir, "", run_id)
    with hold_run_dir(output_dir):
        try:
            config_text = OmegaConf.to_yaml(cfg, resolve=True)
            force = cfg.get("force", False)
            if not force and (previous := finished_run(output_dir, config_text)):
                log.info("Skipping %s: results for this exact config exist (force=true redoes it).",
                         output_dir)  # fmt: skip
                return previous.metrics
            if not force:
                refuse_other_results(output_dir)
            return fit_and_test(cfg, output_dir, config_text, run_id)
        except RunDirTaken:
            raise
        except Exception as error:
            end_wandb_run(exit_code=1)
            record_failure(cfg, error, run_id)
            raise


def fit_and_test(cfg: DictConfig, output_dir: Path, config_text: str, run_id: str) -> dict[str, float]:
    """The run's steps, in the run dir that :func:`train` holds; returns its metrics. On several processes
    every rank computes (each its share of the images) and rank 0 alone writes."""
    writes = distributed.is_launching_process()
    if writes:
        for stale in ("metrics.json", "error.log"):  # an earlier run's, not this one's
            (output_dir / stale).unlink(missing_ok=True)
        (output_dir / "config.yaml").write_text(config_text)
        run_record(cfg, "running", run_id).write(output_dir)  # a job killed outright stays "running"
    check_settings(cfg)
    prepare_process(cfg.reuse_freed_memory, cfg.get("num_threads"))
    pl.seed_everything(cfg.seed, workers=True)

    fits_once = issubclass(get_class(cfg.method.model._target_), FitOnceModel)
    datamodule: AnomalyDataModule = instantiate(cfg.dataset, train_in_order=fits_once)
    tiling = tiling_of(cfg, datamodule.preprocessing)
    model = build_model(cfg, tiling)
    module: AnomalyModule = instantiate(cfg.method.module, model=model)
    loggers = build_loggers(cfg)
    trainer = build_trainer(cfg, loggers)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    datamodule.setup()  # every file listed and checked before any work
    source = calibration_source(cfg.threshold.source, datamodule, model)  # a wrong source stops here
    if len(datamodule.train_samples) < trainer.world_size:
        raise ConfigError(
            f"{trainer.world_size} processes need at least as many training images, got "
            f"{len(datamodule.train_samples)}: use fewer (trainer.devices, trainer.num_nodes)"
        )

    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    calibration = calibrate(cfg, source, trainer, module, datamodule, tiling)
    calibration_seconds = time.perf_counter() - start
    model_config = OmegaConf.to_container(cfg.method.model, resolve=True)
    if writes:  # every rank holds the same fitted model
        path = output_dir / "model.safetensors"
        save_model(
            model, cfg.method.name, model_config, datamodule.preprocessing, path, calibration, tiling=tiling
        )

    start = time.perf_counter()
    test(cfg, trainer, module, datamodule, calibration)
    score_unlabeled(trainer, module, datamodule, calibration, output_dir)
    test_seconds = time.perf_counter() - start
    if not writes:
        return module.test_metrics

    metrics = {
        **module.test_metrics,
        "fit_seconds": round(fit_seconds, 2),
        "calibration_seconds": round(calibration_seconds, 2),
        "test_seconds": round(test_seconds, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    summary = calibration.summary() if calibration else None
    (output_dir / "metrics.json").write_text(json.dumps({**metrics, "calibration": summary}, indent=2) + "\n")
    record = run_record(cfg, "ok", run_id, metrics=module.test_metrics)
    record.calibration = summary
    timings = ("fit_seconds", "calibration_seconds", "test_seconds", "peak_rss_mb")
    record.timings = {key: metrics[key] for key in timings}
    record.skipped_files = [problem.describe() for problem in datamodule.bad_files]
    record.sample_images = [example["path"] for example in module.examples]
    record.write(output_dir)
    add_to_results_db(cfg, record, output_dir)
    heatmaps = save_heatmaps(module.examples, output_dir / "heatmaps")
    for logger in loggers:
        logger.log_metrics(record.timings)
        if isinstance(logger, WandbLogger) and heatmaps:
            logger.log_image("heatmaps", [str(p) for p in heatmaps], caption=[p.stem for p in heatmaps])
    end_wandb_run(exit_code=0)
    print_summary(record, output_dir)
    return metrics


def check_settings(cfg: DictConfig) -> None:
    """The run's own values that no constructor checks, before any work: the seed and the thresholds."""
    seed = cfg.seed
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be an int in [0, {MAX_SEED}] (numpy's range), got {seed!r}")
    threshold = cfg.threshold
    if threshold.source != "none":
        check_budgets(threshold.false_alarm_rate, threshold.pixel_false_alarm_rate, threshold.confidence)


def build_trainer(cfg: DictConfig, loggers: list[Logger]) -> pl.Trainer:
    """The Lightning trainer of ``configs/trainer``; ``trainer.strategy=ddp`` is our DDP, which fit-once
    methods need (Lightning's own refuses a module without trainable parameters)."""
    if cfg.trainer.get("strategy") == "ddp":
        return instantiate(cfg.trainer, logger=loggers or False, strategy=DDPStrategy())
    return instantiate(cfg.trainer, logger=loggers or False)


def build_model(cfg: DictConfig, tiling: Tiling | None) -> AnomalyModel:
    """The method's model (with its backbone, where it uses one); fitted and scored tile by tile with a
    tiling."""

    def build() -> AnomalyModel:
        return instantiate(cfg.method.model)

    return build() if tiling is None else tile_model(build, tiling)


def tiling_of(cfg: DictConfig, preprocessing: Preprocessing) -> Tiling | None:
    """The run's tiling (``tiling.tile_size`` set), over the one size that every preprocessed image has."""
    settings = cfg.get("tiling") or {}
    if not settings.get("tile_size"):
        return None
    if preprocessing.output_size is None:
        raise ConfigError(
            "Tiling needs one size for every image: set dataset.image_size=[height, width] (e.g. the "
            "images' own size, to tile them at full resolution) or dataset.crop_size"
        )
    stride = settings.get("stride") or settings.tile_size
    return Tiling(settings.tile_size, stride, preprocessing.output_size, bool(settings.get("per_position")))


def calibrate(
    cfg: DictConfig,
    source: str | None,
    trainer: pl.Trainer,
    module: AnomalyModule,
    datamodule: AnomalyDataModule,
    tiling: Tiling | None,
) -> Calibration | None:
    """The decision thresholds, from normal images the model did not fit on (never the test set), from
    ``source`` (:func:`calibration_source`). On several processes each scores its share of the images and
    the scores are gathered in data-set order: every rank fits the same thresholds."""
    settings = cfg.threshold
    if source is None:
        return None
    if source == "cross_fit":
        device = trainer.strategy.root_device  # Lightning hands the model back on the CPU after fitting
        model = module.model.to(device)
        count = min(settings.folds, len(datamodule.train_samples))  # tiny data: one image per fold
        log.info("Calibrating on held-out scores of a %d-fold cross-fit over the training images "
                 "(dataset.calibration_dir=<good images> is exact and cheaper).", count)  # fmt: skip
        folds = [partial(images_on, loader, device) for loader in datamodule.fold_dataloaders(count)]
        with torch.no_grad():
            scores, maxima = model.cross_fit_scores(folds, lambda: build_model(cfg, tiling).to(device))
        scores, maxima = distributed.all_gather_rows(scores), distributed.all_gather_rows(maxima)
        where = f"cross-fit over the {len(datamodule.train_samples)} training images ({count} folds)"
    else:
        outputs = trainer.predict(module, dataloaders=datamodule.calibration_dataloader())
        if non_finite := distributed.gather_objects([path for out in outputs for path in out["non_finite"]]):
            raise non_finite_error(non_finite)
        scores = distributed.all_gather_rows(torch.cat([output["image_score"] for output in outputs]))
        maxima = distributed.all_gather_rows(torch.cat([output["map_max"] for output in outputs]))
        where = "dataset.calibration_dir" if source == "folder" else "held-out split of the training images"
    return fit_calibration(
        scores.cpu(), maxima.cpu(), settings.false_alarm_rate, settings.pixel_false_alarm_rate,
        settings.confidence, where,
    )  # fmt: skip


def calibration_source(setting: str, datamodule: AnomalyDataModule, model) -> str | None:
    """Where the normal scores come from: ``folder``, ``validation``, ``cross_fit`` or None (no threshold)."""
    available = {
        "folder": datamodule.calibration_dir is not None,
        "validation": bool(datamodule.val_samples) and datamodule.calibration_dir is None,
        "cross_fit": isinstance(model, FitOnceModel),
    }
    if setting == "none":
        return None
    if setting == "auto":
        source = next((name for name, ok in available.items() if ok), None)
        if source is None:
            log.warning(
                "No normal images to calibrate a threshold on: set dataset.val_fraction > 0 or "
                "dataset.calibration_dir=<folder of good parts>. The run has no threshold."
            )
        return source
    if setting not in available:
        raise ConfigError(
            f"threshold.source must be auto, folder, validation, cross_fit or none, got {setting!r}"
        )
    if not available[setting]:
        raise ConfigError(
            f"threshold.source={setting} needs " + {
                "folder": "dataset.calibration_dir", "validation": "dataset.val_fraction > 0",
                "cross_fit": "a fit-once method (PaDiM, PatchCore)",
            }[setting]
        )  # fmt: skip
    return setting


def images_on(loader, device: torch.device):
    """The images of ``loader``'s batches, on ``device``."""
    return (batch["image"].to(device) for batch in loader)


def test(
    cfg: DictConfig,
    trainer: pl.Trainer,
    module: AnomalyModule,
    datamodule: AnomalyDataModule,
    calibration: Calibration | None,
) -> None:
    """Test metrics at the calibrated thresholds, and the heatmap examples (spread over the test set)."""
    labels = {sample.label for sample in datamodule.test_samples}
    if labels != {0, 1}:
        kind = "good" if labels == {0} else "defective"
        count = len(datamodule.test_samples)
        log.warning("The test set has only %s images (%d): no test metrics.", kind, count)
        return
    module.threshold = calibration.threshold if calibration else None
    module.pixel_threshold = calibration.pixel_threshold if calibration else None
    module.aupro_fpr_limit = cfg.evaluation.aupro_fpr_limit
    module.exact_pixel_limit = cfg.evaluation.exact_pixel_limit
    module.histogram_bins = cfg.evaluation.histogram_bins
    module.pixel_metrics = datamodule.has_pixel_ground_truth()
    if not module.pixel_metrics:
        log.warning("The defective test images have no masks: image metrics only, no pixel metrics.")
    module.example_ids = spread(len(datamodule.test_samples), module.num_examples)
    trainer.test(module, datamodule=datamodule, verbose=False)


def score_unlabeled(
    trainer: pl.Trainer,
    module: AnomalyModule,
    datamodule: AnomalyDataModule,
    calibration: Calibration | None,
    output_dir: Path,
) -> None:
    """Maps of the test sets without ground truth (MVTec AD 2's private ones), written by the data set
    in the format its evaluation takes."""
    device = trainer.strategy.root_device
    model = module.model.to(device).eval()
    pixel_threshold = calibration.pixel_threshold if calibration else None
    for name, samples in datamodule.unlabeled.items():
        log.info("Scoring %s (%d images without ground truth) for the data set's own evaluation.",
                 name, len(samples))  # fmt: skip
        done = distributed.block_range(len(samples), distributed.world_size(), distributed.rank()).start
        written = output_dir  # (each rank writes the files of its block)
        with torch.no_grad():
            for batch in datamodule.unlabeled_dataloader(name):
                output = model(batch["image"].to(device))
                check_finite(output, batch["path"])
                maps = output.anomaly_map.float().cpu()
                batch_samples = samples[done : done + len(maps)]
                written = datamodule.write_unlabeled(name, batch_samples, maps, pixel_threshold, output_dir)
                done += len(maps)
        log.info("Wrote the maps of %s for the data set's evaluation to %s", name, written)


def spread(total: int, count: int) -> set[int]:
    """``count`` positions spread evenly over ``range(total)``, first and last included."""
    count = min(count, total)
    return {round(i * (total - 1) / max(count - 1, 1)) for i in range(count)}


def build_loggers(cfg: DictConfig) -> list[Logger]:
    return [instantiate(node) for node in (cfg.get("logger") or {}).values()]


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


def end_wandb_run(exit_code: int) -> None:
    """Finishes this job's wandb run, if any: jobs of a sweep can share a process (Hydra's basic launcher,
    joblib workers), and WandbLogger would log the next job into a run that is still open."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def hold_run_dir(output_dir: Path) -> Iterator[None]:
    """An OS lock on ``output_dir`` while the run writes there: a second anomaly-train in the same folder at
    the same time is refused, while a folder a killed run left "running" (the lock went with its process)
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


def record_failure(cfg: DictConfig, error: BaseException, run_id: str) -> None:
    """The failed run's record (its error in one line) and ``error.log`` with the traceback."""
    output_dir = Path(cfg.paths.output_dir)
    found = user_error(error)
    text = user_message(found) if found else "".join(traceback.format_exception_only(error)).strip()
    try:
        record = run_record(cfg, "failed", run_id, error=text)
    except Exception:  # the config itself does not resolve: name the run by its config choices
        choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
        record = RunRecord(choices.get("method", "?"), None, choices.get("dataset", ""), "?",
                           cfg.get("seed", 0), "failed", error=text, run_id=run_id)  # fmt: skip
    record.write(output_dir)
    (output_dir / "error.log").write_text(traceback.format_exc())
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


def print_summary(record: RunRecord, output_dir: Path) -> None:
    title = " | ".join(filter(None, (record.method, record.backbone, record.category)))
    values = {**record.metrics, **record.timings}
    rows = "\n".join(f"  {key:<38} {value:>10.4f}" for key, value in values.items())
    skipped = f"\n  skipped files: {len(record.skipped_files)} (run.json)" if record.skipped_files else ""
    calibration = describe_calibration(record.calibration)
    print(f"\n{title}\n{rows}{skipped}\n{calibration}\n  outputs: {output_dir}\n", flush=True)


def describe_calibration(calibration: dict | None) -> str:
    """The thresholds' guarantee in words."""
    if calibration is None:
        return "  no threshold (threshold.source=none, or no normal images to calibrate on: see the log)"
    c = calibration
    met = (
        ""
        if c["guaranteed_rate"] <= c["false_alarm_rate"]
        else f" (budget {100 * c['false_alarm_rate']:g} %)"
    )
    return (
        f"  threshold {c['threshold']:.6g} from {c['num_images']} normal images ({c['source']}): at most "
        f"{100 * c['guaranteed_rate']:.1f} % false alarms on good parts with {100 * c['confidence']:.0f} % "
        f"confidence{met}; pixel threshold {c['pixel_threshold']:.6g}: at most "
        f"{100 * c['pixel_guaranteed_rate']:.1f} % of good parts with any false-positive pixel"
    )


def run_job(cfg: DictConfig) -> float | None:
    """One job: a failure is recorded in its run dir; inside a sweep the sweep goes on (its report lists
    the failure and the command exits non-zero at the end). A run dir that is another run's stops a sweep
    too: nothing of the refused job is recorded, so its report would show that other run as this one."""
    try:
        metrics = train(cfg)
    except Exception as error:
        if HydraConfig.get().mode != RunMode.MULTIRUN or isinstance(error, RunDirTaken):
            raise
        found = user_error(error)
        if found is None:
            log.exception("Run failed: %s", cfg.paths.output_dir)
        else:
            log.error("Run failed: %s: %s", cfg.paths.output_dir, user_message(found))
        return None
    return metrics.get(cfg.get("optimized_metric"))


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    return report_user_errors(lambda: run_job(cfg))


if __name__ == "__main__":
    main()
