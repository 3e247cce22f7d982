"""``anomaly-train``: fit a method on normal images, calibrate, score the test set, write the run dir.

Builds data, model, Lightning module, loggers and trainer from the Hydra config; checks every data file;
fits; calibrates the decision threshold on normal held-out images; saves the model; tests; writes
``run.json``, ``metrics.json``, ``config.yaml``, ``model.safetensors`` and heatmaps. Returns the metric
named by ``optimized_metric`` so that Hydra sweepers can optimise it. (Over 300 lines because it is the
one place where a run's steps meet; each step is a function of its own, in the order they run.)
"""

import json
import logging
import resource
import sqlite3
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, WandbLogger  # ours (configs/logger/wandb.yaml) is one too

from anomaly.calibration import Calibration, fit_calibration
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
from anomaly.methods.base import AnomalyModel, FitOnceModel
from anomaly.methods.lightning import AnomalyModule
from anomaly.methods.tiling import Tiling, tile_model
from anomaly.model_io import save_model
from anomaly.reports.database import append_run
from anomaly.reports.records import RunRecord
from anomaly.visualization import save_heatmaps

log = logging.getLogger(__name__)
TABLE_AXES = ("method", "backbone", "dataset", "dataset.category", "seed")  # never part of a variant


def train(cfg: DictConfig) -> dict[str, float]:
    """Runs one experiment; returns its metrics (also in ``<output_dir>/metrics.json`` and ``run.json``)."""
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config_text = OmegaConf.to_yaml(cfg, resolve=True)
    if (previous := finished_run(output_dir, config_text)) and not cfg.get("force", False):
        log.info("Skipping %s: results for this exact config exist (force=true redoes it).", output_dir)
        return previous.metrics
    (output_dir / "metrics.json").unlink(missing_ok=True)  # an earlier config's metrics are not this run's
    (output_dir / "config.yaml").write_text(config_text)
    run_record(cfg, "running").write(output_dir)  # a job killed outright stays "running"
    prepare_process(cfg.reuse_freed_memory, cfg.get("num_threads"))
    pl.seed_everything(cfg.seed, workers=True)

    datamodule: AnomalyDataModule = instantiate(cfg.dataset)
    tiling = tiling_of(cfg, datamodule.preprocessing)
    model = build_model(cfg, tiling)
    module: AnomalyModule = instantiate(cfg.method.module, model=model)
    loggers = build_loggers(cfg)
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    datamodule.setup()  # every file listed and checked before any work

    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    calibration = calibrate(cfg, trainer, module, datamodule, tiling)
    calibration_seconds = time.perf_counter() - start
    model_config = OmegaConf.to_container(cfg.method.model, resolve=True)
    path = output_dir / "model.safetensors"
    save_model(
        model, cfg.method.name, model_config, datamodule.preprocessing, path, calibration, tiling=tiling
    )

    start = time.perf_counter()
    test(cfg, trainer, module, datamodule, calibration)
    score_unlabeled(trainer, module, datamodule, calibration, output_dir)
    test_seconds = time.perf_counter() - start

    metrics = {
        **module.test_metrics,
        "fit_seconds": round(fit_seconds, 2),
        "calibration_seconds": round(calibration_seconds, 2),
        "test_seconds": round(test_seconds, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    summary = calibration.summary() if calibration else None
    (output_dir / "metrics.json").write_text(json.dumps({**metrics, "calibration": summary}, indent=2) + "\n")
    record = run_record(cfg, "ok", metrics=module.test_metrics)
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
    trainer: pl.Trainer,
    module: AnomalyModule,
    datamodule: AnomalyDataModule,
    tiling: Tiling | None,
) -> Calibration | None:
    """The decision thresholds, from normal images the model did not fit on (never the test set)."""
    settings = cfg.threshold
    source = calibration_source(settings.source, datamodule, module.model)
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
        where = f"cross-fit over the {len(datamodule.train_samples)} training images ({count} folds)"
    else:
        outputs = trainer.predict(module, dataloaders=datamodule.calibration_dataloader())
        scores = torch.cat([output["image_score"] for output in outputs])
        maxima = torch.cat([output["map_max"] for output in outputs])
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
        done, written = 0, output_dir
        with torch.no_grad():
            for batch in datamodule.unlabeled_dataloader(name):
                maps = model(batch["image"].to(device)).anomaly_map.float().cpu()
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
    cfg: DictConfig, status: str, metrics: dict | None = None, error: str | None = None
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


def finished_run(output_dir: Path, config_text: str) -> RunRecord | None:
    """The record of an earlier successful run in ``output_dir`` with the identical resolved config."""
    config, record = output_dir / "config.yaml", RunRecord.read(output_dir)
    if record is None or record.status != "ok" or not config.is_file() or config.read_text() != config_text:
        return None
    return record


def record_failure(cfg: DictConfig, error: BaseException) -> None:
    """The failed run's record (its error in one line) and ``error.log`` with the traceback."""
    output_dir = Path(cfg.paths.output_dir)
    found = user_error(error)
    text = user_message(found) if found else "".join(traceback.format_exception_only(error)).strip()
    try:
        record = run_record(cfg, "failed", error=text)
    except Exception:  # the config itself does not resolve: name the run by its config choices
        choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
        record = RunRecord(choices.get("method", "?"), None, choices.get("dataset", ""), "?",
                           cfg.get("seed", 0), "failed", error=text)  # fmt: skip
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
        return "  no threshold (no normal images to calibrate on)"
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
    the failure and the command exits non-zero at the end)."""
    try:
        metrics = train(cfg)
    except Exception as error:
        end_wandb_run(exit_code=1)
        record_failure(cfg, error)
        if HydraConfig.get().mode != RunMode.MULTIRUN:
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
