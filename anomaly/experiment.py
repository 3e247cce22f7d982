"""One run as a library call: :func:`run` fits a method on normal images, calibrates, tests and writes.

The steps, in the order they run: every data file checked; fit; the decision thresholds calibrated on
normal images the model did not fit on (:mod:`anomaly.calibration`); the model saved; the test set scored;
``run.json``, ``metrics.json``, ``config.yaml``, ``model.safetensors`` and heatmaps written to the run dir
(:mod:`anomaly.run_dir` keeps it). ``anomaly-train`` is this, for one composed config. On several processes
every rank computes its share and rank 0 alone writes. (Over 300 lines because it is the one place where a
run's steps meet; each step is a function of its own, in the order they run.)
"""

import json
import logging
import resource
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, WandbLogger  # ours (configs/logger/wandb.yaml) is one too

from anomaly import distributed
from anomaly.backbones.feature_cache import FeatureCache
from anomaly.calibration import Calibration, CalibrationSource, check_budgets, choose_source, fit_calibration
from anomaly.data.datamodule import AnomalyDataModule
from anomaly.data.preprocessing import Preprocessing
from anomaly.data.samples import part_numbers
from anomaly.errors import ConfigError
from anomaly.methods.base import (
    AnomalyModel,
    FitOnceModel,
    RunResources,
    TrainedModel,
    images_on,
    non_finite_error,
    score_batches,
)
from anomaly.methods.lightning import AnomalyModule, DDPStrategy, ScoringModule, TestResult, collective_of
from anomaly.methods.tiling import Tiling, tile_model
from anomaly.metrics import CategoryEvaluators
from anomaly.model_io import MODEL_FILE_NAME, read_calibration, save_model
from anomaly.reports.records import RunRecord
from anomaly.reports.submissions import WRITERS
from anomaly.run_dir import (
    RunDirTaken,
    add_to_results_db,
    finished_run,
    hold_run_dir,
    record_failure,
    refuse_other_results,
    run_record,
    start_run,
)
from anomaly.visualization import save_heatmaps

log = logging.getLogger(__name__)
MAX_SEED = 2**32 - 1  # numpy's seeds
TIMINGS = ("fit_seconds", "calibration_seconds", "test_seconds", "peak_rss_mb")


@dataclass
class RunResult:
    """What a run returns (and wrote to its run dir)."""

    metrics: dict[str, float]  # the test metrics and the timings (metrics.json)
    calibration: Calibration | None  # the thresholds and their guarantee; None without one
    output_dir: Path
    model_path: Path | None  # its model.safetensors; None on the further ranks of a distributed run
    record: RunRecord | None  # its run.json; None on the further ranks
    examples: list[dict] = field(default_factory=list)  # the test images of the heatmaps, with their maps
    skipped: bool = False  # an earlier run of the identical config held the results (force=true redoes it)

    def describe(self) -> str:
        """What a user reads at the end of a run: the metrics, the threshold's guarantee, where it all is."""
        record = self.record
        title = " | ".join(filter(None, (record.method, record.backbone, record.category)))
        if self.skipped:
            title += " (results of an earlier run of this config; force=true redoes it)"
        rows = "\n".join(f"  {key:<38} {value:>10.4f}" for key, value in self.metrics.items())
        if per_category := record.category_metrics:
            heading = f"  per category (the metrics above: their mean over {len(per_category)} categories)"
            rows = f"{rows}\n{heading}\n{per_category_lines(per_category)}"
        skipped = f"\n  skipped files: {len(record.skipped_files)} (run.json)" if record.skipped_files else ""
        calibration = (
            self.calibration.describe() if self.calibration
            else f"no threshold: {record.threshold_note or 'see the log'}"
        )  # fmt: skip
        return f"\n{title}\n{rows}{skipped}\n  {calibration}\n  outputs: {self.output_dir}\n"


PER_CATEGORY_SHOWN = ("image_auroc", "pixel_auroc", "pixel_aupro", "false_alarm_rate")


def per_category_lines(per_category: dict[str, dict[str, float]]) -> str:
    """A unified run's categories, a line each: the metrics of :data:`PER_CATEGORY_SHOWN` that it has (the
    false-alarm rate: observed on the category's good test images at the run's one threshold)."""
    keys = [key for key in PER_CATEGORY_SHOWN if key in next(iter(per_category.values()))]
    lines = [f"  {'category':<20}" + "".join(f"{key:>18}" for key in keys)]
    for category, metrics in per_category.items():
        lines.append(f"  {category:<20}" + "".join(f"{metrics[key]:>18.4f}" for key in keys))
    return "\n".join(lines)


def run(cfg: DictConfig) -> RunResult:
    """Runs the experiment ``cfg`` describes (:func:`anomaly.compose`, or a command's config).

    The run holds its dir until its record is written (:func:`anomaly.run_dir.hold_run_dir`). A failure is
    recorded there (``run.json``, ``error.log``, the results database) and raised; a dir that is another
    run's is refused with :class:`RunDirTaken` before anything is written. On several processes every rank
    reads the same folder and so takes rank 0's decision to skip, refuse or run; rank 0 alone writes.
    """
    output_dir = Path(cfg.paths.output_dir)
    run_id = uuid.uuid4().hex  # the run's row in the results database, whatever else ran in its folder
    writes = distributed.is_launching_process()
    config_text = OmegaConf.to_yaml(cfg, resolve=True)
    with hold_run_dir(output_dir) if writes else nullcontext(), lightning_notes_silenced():
        try:
            if not cfg.get("force", False):
                if previous := finished_run(output_dir, config_text):
                    return skipped_run(output_dir, previous)
                refuse_other_results(output_dir, config_text)
            if writes:
                start_run(output_dir, config_text, run_record(cfg, "running", run_id))
            return fit_and_test(cfg, output_dir, run_id)
        except RunDirTaken:
            raise
        except Exception as error:
            if writes:
                end_wandb_run(exit_code=1)
                record_failure(cfg, error, run_id)
            raise


def skipped_run(output_dir: Path, previous: RunRecord) -> RunResult:
    """The result of an earlier run of the identical config in ``output_dir`` (``force=true`` redoes it)."""
    log.info("Skipping %s: results for this exact config exist (force=true redoes it).", output_dir)
    model_path = output_dir / MODEL_FILE_NAME
    calibration = read_calibration(model_path) if model_path.is_file() else None
    metrics = {**previous.metrics, **previous.timings}
    return RunResult(metrics, calibration, output_dir, model_path, previous, skipped=True)


def fit_and_test(cfg: DictConfig, output_dir: Path, run_id: str) -> RunResult:
    """The run's steps, in the run dir that :func:`run` holds."""
    check_settings(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    model_class = get_class(cfg.method.model._target_)
    fits_once = issubclass(model_class, FitOnceModel)
    normalization_share = model_class.normalization_share if issubclass(model_class, TrainedModel) else 0.0
    datamodule: AnomalyDataModule = instantiate(
        cfg.dataset, train_in_order=fits_once, normalization_share=normalization_share
    )
    tiling = tiling_of(cfg, datamodule.preprocessing)
    resources = resources_of(cfg)
    datamodule.use_cache(resources.feature_cache.store if resources.feature_cache is not None else None)
    model = build_model(cfg, tiling, resources)
    module: AnomalyModule = instantiate(cfg.method.module, model=model)
    loggers = [instantiate(node) for node in (cfg.get("logger") or {}).values()]
    trainer = build_trainer(cfg, loggers)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    datamodule.setup()  # every file listed and checked before any work
    check_enough_images(cfg.method.name, model, datamodule)
    few_shot = datamodule.shots is not None
    source = choose_source(cfg.threshold.source, datamodule.calibration_origin, fits_once,
                           len(datamodule.train_samples), cfg.threshold.folds, few_shot,
                           datamodule.shot_augment)  # fmt: skip
    needed = {"training": datamodule.train_samples}
    if normalization_share:
        needed["normalisation"] = datamodule.normalization_samples
    if few_shot and normalization_share and not datamodule.normalization_samples:
        raise ConfigError(
            f"{cfg.method.name} normalises its maps on normal images it did not train on, and a few-shot "
            f"run (dataset.shots={datamodule.shots}) has none besides its k images: give "
            "dataset.calibration_dir=<folder of good parts>, or dataset.shot_calibration=<n> (n >= 2: half "
            "normalise, half calibrate the threshold) to take n un-drawn training images."
        )
    for what, samples in needed.items():
        if len(samples) < trainer.world_size:
            raise ConfigError(
                f"{trainer.world_size} processes need at least as many {what} images, got {len(samples)}: "
                "use fewer (trainer.devices, trainer.num_nodes) or more images (dataset.calibration_fraction "
                "holds out the normalisation images)"
            )

    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    calibration = calibrate(cfg, source, trainer, model, datamodule, tiling, resources)
    calibration_seconds = time.perf_counter() - start
    writes = distributed.is_launching_process()  # every rank holds the same model (the glue checks)
    model_path = output_dir / MODEL_FILE_NAME if writes else None
    if model_path is not None:
        model_config = OmegaConf.to_container(cfg.method.model, resolve=True)
        save_model(model, cfg.method.name, model_config, datamodule.preprocessing, model_path, calibration,
                   tiling=tiling)  # fmt: skip

    start = time.perf_counter()
    tested = test(cfg, trainer, model, datamodule, calibration)
    score_unlabeled(trainer, model, datamodule, calibration, output_dir)
    test_seconds = time.perf_counter() - start
    cache = resources.feature_cache
    if cache is not None:
        log.info("Feature cache %s: %d images read, %d computed by the backbone.", cache.store.root,
                 cache.read, cache.computed)  # fmt: skip
    timings = {
        "fit_seconds": round(fit_seconds, 2),
        "calibration_seconds": round(calibration_seconds, 2),
        "test_seconds": round(test_seconds, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    metrics = {**tested.metrics, **timings}
    if not writes:
        return RunResult(metrics, calibration, output_dir, None, None, tested.examples)
    no_threshold = source.description if source.kind == "none" else None
    record = write_results(
        cfg, run_id, output_dir, tested, timings, calibration, datamodule, cache, no_threshold
    )
    heatmaps = save_heatmaps(tested.examples, output_dir / "heatmaps")
    for logger in loggers:
        logger.log_metrics(timings)
        if isinstance(logger, WandbLogger) and heatmaps:
            logger.log_image("heatmaps", [str(p) for p in heatmaps], caption=[p.stem for p in heatmaps])
    end_wandb_run(exit_code=0)
    return RunResult(metrics, calibration, output_dir, model_path, record, tested.examples)


@contextmanager
def lightning_notes_silenced() -> Iterator[None]:
    """Two Lightning warnings that say nothing about a run, silenced for its duration only."""
    with warnings.catch_warnings():
        # The backbone is frozen in eval mode on purpose (BatchNorm statistics and dropout belong to the
        # pretrained network); Lightning warns about any module in eval mode at the start of fitting.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        # pytorch-lightning 2.6's data-loader flattening calls a torch.utils._pytree API that torch 2.10+
        # deprecates; harmless, and not ours to change.
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
        yield


EVALUATION_VALUES = {  # evaluation.<key>: (its type, its range, the range in words)
    "num_examples": (int, lambda value: value >= 0, "an int >= 0"),
    "aupro_fpr_limit": (float, lambda value: 0 < value <= 1, "a number in (0, 1]"),
    "exact_pixel_limit": (int, lambda value: value >= 0, "an int >= 0 (0: always the histogram)"),
    "histogram_bins": (int, lambda value: value >= 2, "an int >= 2"),
}


def check_settings(cfg: DictConfig) -> None:
    """The run's own values that no constructor checks before any work: the seed, the thresholds, the spill
    folder and the evaluation (whose Evaluator is built only when testing starts, after the fit)."""
    seed = cfg.seed
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be an int in [0, {MAX_SEED}] (numpy's range), got {seed!r}")
    threshold = cfg.threshold
    if threshold.source != "none":
        check_budgets(threshold.false_alarm_rate, threshold.pixel_false_alarm_rate, threshold.confidence)
    spill_dir = cfg.paths.get("spill_dir")
    if spill_dir is not None and not Path(spill_dir).is_dir():
        what = "is a file" if Path(spill_dir).exists() else "does not exist"
        raise ConfigError(
            f"paths.spill_dir={spill_dir} {what}: it must be a folder with room for PatchCore's training "
            "patches. Create it, or name another (null: the system temp dir, $TMPDIR)."
        )
    for key, (kind, in_range, expected) in EVALUATION_VALUES.items():
        value = cfg.evaluation.get(key)
        numbers = (int, float) if kind is float else (int,)
        if isinstance(value, bool) or not isinstance(value, numbers) or not in_range(value):
            raise ConfigError(f"evaluation.{key} must be {expected}, got {value!r}")


def check_enough_images(method: str, model: AnomalyModel, datamodule: AnomalyDataModule) -> None:
    """Before any work: the method's smallest number of training images (a few-shot run's smallest k)."""
    minimum, why = model.minimum_training_images()
    count = datamodule.training_image_count()
    if count < minimum:
        fix = f"dataset.shots >= {minimum}" if datamodule.shots is not None else "more normal training images"
        raise ConfigError(f"{method} needs at least {minimum} training images ({why}); this run has {count}: "
                          f"use {fix}.")  # fmt: skip


def build_trainer(cfg: DictConfig, loggers: list[Logger]) -> pl.Trainer:
    """The Lightning trainer of ``configs/trainer``; ``trainer.strategy=ddp`` is our DDP, which fit-once
    methods need (Lightning's own refuses a module without trainable parameters)."""
    if cfg.trainer.get("strategy") == "ddp":
        return instantiate(cfg.trainer, logger=loggers or False, strategy=DDPStrategy())
    return instantiate(cfg.trainer, logger=loggers or False)


def build_model(cfg: DictConfig, tiling: Tiling | None, resources: RunResources) -> AnomalyModel:
    """The method's model, fitted and scored tile by tile with a tiling, using the run's ``resources``
    (its spill folder and feature cache: run settings, not saved with it)."""
    build = partial(instantiate, cfg.method.model)
    model = build() if tiling is None else tile_model(build, tiling)
    model.use_resources(resources)
    return model


def resources_of(cfg: DictConfig) -> RunResources:
    """The run's spill folder (``paths.spill_dir``) and its feature cache in ``paths.cache_dir``
    (``cache=true``), capped at ``cache_max_gb``."""
    cache = FeatureCache.open(cfg.paths.cache_dir, cfg.get("cache_max_gb", 20)) if cfg.get("cache") else None
    return RunResources(cfg.paths.get("spill_dir"), cache)


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
    source: CalibrationSource,
    trainer: pl.Trainer,
    model: AnomalyModel,
    datamodule: AnomalyDataModule,
    tiling: Tiling | None,
    resources: RunResources,
) -> Calibration | None:
    """The decision thresholds, from the normal images ``source`` names (never the test set). On several
    processes each scores its share of the images and the scores are gathered in data-set order: every
    rank fits the same thresholds."""
    if source.kind == "none":
        return None
    collective = collective_of(trainer)
    if source.kind == "cross_fit":
        device = trainer.strategy.root_device  # Lightning hands the model back on the CPU after fitting
        count = min(cfg.threshold.folds, len(datamodule.train_samples))
        log.info("Calibrating on held-out scores of a %d-fold cross-fit over the training images "
                 "(dataset.calibration_dir=<good images> is exact and cheaper).", count)  # fmt: skip
        folds = [partial(images_on, loader, device) for loader in datamodule.fold_dataloaders(count)]
        with torch.no_grad():
            new_model = lambda: build_model(cfg, tiling, resources).to(device)  # noqa: E731
            scores, maxima = model.to(device).cross_fit_scores(folds, new_model, collective)
    else:
        outputs = trainer.predict(ScoringModule(model), dataloaders=datamodule.calibration_dataloader())
        if non_finite := collective.gather_objects([path for out in outputs for path in out["non_finite"]]):
            raise non_finite_error(non_finite)
        # (a rank may hold no calibration image when there are fewer than ranks)
        scores = torch.cat([torch.empty(0), *(output["image_score"] for output in outputs)])
        maxima = torch.cat([torch.empty(0), *(output["map_max"] for output in outputs)])
    scores, maxima = collective.gather_rows(scores), collective.gather_rows(maxima)
    settings = cfg.threshold
    return fit_calibration(
        scores.cpu(), maxima.cpu(), settings.false_alarm_rate, settings.pixel_false_alarm_rate,
        settings.confidence, source.description,
    )  # fmt: skip


def test(
    cfg: DictConfig,
    trainer: pl.Trainer,
    model: AnomalyModel,
    datamodule: AnomalyDataModule,
    calibration: Calibration | None,
) -> TestResult:
    """Test metrics at the calibrated thresholds, each category's apart (a unified run's headline metrics
    are their mean), the per-sample metrics too where test images are views of one part (Real-IAD), and the
    heatmap examples (spread over the test set)."""
    labels = {sample.label for sample in datamodule.test_samples}
    if labels != {0, 1}:
        kind = "good" if labels == {0} else "defective"
        count = len(datamodule.test_samples)
        log.warning("The test set has only %s images (%d): no test metrics.", kind, count)
        return TestResult({}, [], {})
    pixel_metrics = datamodule.has_pixel_ground_truth()
    if not pixel_metrics:
        log.warning("The defective test images have no masks: image metrics only, no pixel metrics.")
    settings = cfg.evaluation
    categories = list(dict.fromkeys(sample.category for sample in datamodule.test_samples))
    evaluator = CategoryEvaluators(categories, pixel_metrics, settings.aupro_fpr_limit,
                                   settings.exact_pixel_limit, settings.histogram_bins,
                                   part_numbers(datamodule.test_samples))  # fmt: skip
    thresholds = (calibration.threshold, calibration.pixel_threshold) if calibration else (None, None)
    examples = frozenset(spread(len(datamodule.test_samples), settings.num_examples))
    scoring = ScoringModule(model, evaluator, thresholds, examples)
    trainer.test(scoring, datamodule=datamodule, verbose=False)
    return scoring.result


def score_unlabeled(
    trainer: pl.Trainer,
    model: AnomalyModel,
    datamodule: AnomalyDataModule,
    calibration: Calibration | None,
    output_dir: Path,
) -> None:
    """Maps of the test sets without ground truth (MVTec AD 2's private ones), written by the data set
    in the format its evaluation takes (each rank writes the files of its block)."""
    device = trainer.strategy.root_device
    pixel_threshold = calibration.pixel_threshold if calibration else None
    write = WRITERS[datamodule.submission_format] if datamodule.unlabeled else None
    for name, samples in datamodule.unlabeled.items():
        log.info("Scoring %s (%d images without ground truth) for the data set's own evaluation.",
                 name, len(samples))  # fmt: skip
        written = output_dir
        for batch, output in score_batches(model, datamodule.unlabeled_dataloader(name), device):
            batch_samples = [samples[index] for index in batch["index"].tolist()]
            maps = output.anomaly_map.float().cpu()
            written = write(datamodule.name, name, batch_samples, maps, pixel_threshold, output_dir)
        log.info("Wrote the maps of %s for the data set's evaluation to %s", name, written)


def spread(total: int, count: int) -> set[int]:
    """``count`` positions spread evenly over ``range(total)``, first and last included."""
    count = min(count, total)
    return {round(i * (total - 1) / max(count - 1, 1)) for i in range(count)}


def write_results(
    cfg: DictConfig,
    run_id: str,
    output_dir: Path,
    tested: TestResult,
    timings: dict[str, float],
    calibration: Calibration | None,
    datamodule: AnomalyDataModule,
    cache: FeatureCache | None = None,
    no_threshold: str | None = None,
) -> RunRecord:
    """``metrics.json``, the finished ``run.json`` and the run's row in the results database;
    ``no_threshold``: why the run has no threshold (None: it has one). A unified run (one model for several
    categories) adds each category's metrics (``categories``) to its mean's."""
    summary = calibration.summary() if calibration else None
    per_category = tested.per_category if datamodule.categories is not None else {}
    metrics = {**tested.metrics, **timings, "calibration": summary}
    if per_category:
        metrics["categories"] = per_category
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    record = run_record(cfg, "ok", run_id, metrics=tested.metrics)
    record.category_metrics = per_category
    record.calibration = summary
    record.timings = timings
    record.skipped_files = [problem.describe() for problem in datamodule.bad_files]
    record.sample_images = [example["path"] for example in tested.examples]
    record.feature_cache = cache.counts() if cache is not None else None
    record.threshold_note = no_threshold
    if datamodule.shots is not None:
        record.shot_files = [str(sample.image_path) for sample in datamodule.train_samples]
    record.write(output_dir)
    add_to_results_db(cfg, record, output_dir)
    return record


def end_wandb_run(exit_code: int) -> None:
    """Finishes this job's wandb run, if any: jobs of a sweep can share a process (Hydra's basic launcher,
    joblib workers), and WandbLogger would log the next job into a run that is still open."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
