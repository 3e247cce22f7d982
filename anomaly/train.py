"""``anomaly-train``: fit a method on normal images, score the test set, write everything to the run dir.

Builds data, backbone, model, Lightning module, loggers and trainer from the Hydra config; fits;
saves the model; tests; writes ``metrics.json``, ``config.yaml``, ``model.safetensors`` and heatmaps.
Returns the metric named by ``optimized_metric`` so that Hydra sweepers can optimise it.
"""

import json
import logging
import os
import resource
import sys
import time
import traceback
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, WandbLogger

from anomaly.allocator import keep_freed_memory_for_reuse
from anomaly.model_io import save_model
from anomaly.visualization import save_heatmaps

log = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # the repo's configs/ (editable install)


def sweep_id(default: str) -> str:
    """``${sweep_id:default}``: the sweep folder's name in a multirun (the wandb group that lines a sweep's
    runs up, see configs/logger/wandb.yaml), else ``default``."""
    hydra_config = HydraConfig.get()
    return Path(hydra_config.sweep.dir).name if hydra_config.mode == RunMode.MULTIRUN else default


OmegaConf.register_new_resolver("sweep_id", sweep_id, replace=True)


def build_loggers(cfg: DictConfig) -> list[Logger]:
    return [instantiate(node) for node in (cfg.get("logger") or {}).values()]


def set_cpu_threads(num_threads: int | None) -> None:
    """Torch's CPU threads for this job: ``num_threads``, or by default under ``hydra/launcher=joblib`` the
    cores split between its parallel jobs (each would otherwise start a thread per core)."""
    if num_threads is None:
        n_jobs = HydraConfig.get().launcher.get("n_jobs")
        if n_jobs is None:
            return
        cores = len(os.sched_getaffinity(0))
        parallel_jobs = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib's rule for n_jobs < 0
        num_threads = max(1, cores // parallel_jobs)
    torch.set_num_threads(num_threads)
    log.info("Torch CPU threads: %d", num_threads)


def end_wandb_run(exit_code: int) -> None:
    """Finishes this job's wandb run, if any: jobs of a sweep can share a process (Hydra's basic launcher,
    joblib workers), and WandbLogger would log the next job into a run that is still open."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train(cfg: DictConfig) -> dict[str, float]:
    """Runs one experiment; returns its metrics (also written to ``<output_dir>/metrics.json``)."""
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config_text = OmegaConf.to_yaml(cfg, resolve=True)
    if previous := finished_run(output_dir, config_text, cfg.get("force", False)):
        log.info("Skipping %s: results for this exact config exist (force=true redoes it).", output_dir)
        return previous
    (output_dir / "error.json").unlink(missing_ok=True)
    (output_dir / "metrics.json").unlink(missing_ok=True)  # an earlier config's metrics are not this run's
    (output_dir / "config.yaml").write_text(config_text)
    pl.seed_everything(cfg.seed, workers=True)
    set_cpu_threads(cfg.get("num_threads"))
    if cfg.reuse_freed_memory:
        keep_freed_memory_for_reuse()

    datamodule = instantiate(cfg.dataset)
    model = instantiate(cfg.method.model)  # builds the backbone too, where the method uses one
    module = instantiate(cfg.method.module, model=model)
    loggers = build_loggers(cfg)
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    model_config = OmegaConf.to_container(cfg.method.model, resolve=True)
    path = output_dir / "model.safetensors"
    save_model(model, cfg.method.name, model_config, datamodule.preprocessing, path, module.calibration)

    start = time.perf_counter()
    trainer.test(module, datamodule=datamodule, verbose=False)
    test_seconds = time.perf_counter() - start

    metrics = {
        **module.test_metrics,
        "fit_seconds": round(fit_seconds, 2),
        "test_seconds": round(test_seconds, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    heatmaps = save_heatmaps(module.examples, output_dir / "heatmaps")
    for logger in loggers:
        logger.log_metrics({k: v for k, v in metrics.items() if k not in module.test_metrics})
        if isinstance(logger, WandbLogger) and heatmaps:
            logger.log_image("heatmaps", [str(p) for p in heatmaps], caption=[p.stem for p in heatmaps])
    end_wandb_run(exit_code=0)
    print_summary(cfg, metrics, output_dir)
    return metrics


def finished_run(output_dir: Path, config_text: str, force: bool) -> dict[str, float] | None:
    """The metrics of an earlier run in ``output_dir`` with the identical resolved config, if any."""
    metrics, config = output_dir / "metrics.json", output_dir / "config.yaml"
    if force or not (metrics.is_file() and config.is_file()) or config.read_text() != config_text:
        return None
    return json.loads(metrics.read_text())


def record_failure(output_dir: Path, error: BaseException) -> None:
    """Leaves error.json in the run dir, for the sweep summary (anomaly/benchmark.py)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(traceback.format_exception_only(type(error), error)).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: the last line is the real error
        text = text.splitlines()[-1].strip()
    (output_dir / "error.json").write_text(json.dumps({"error": text, "traceback": traceback.format_exc()}))


def print_summary(cfg: DictConfig, metrics: dict[str, float], output_dir: Path) -> None:
    title = f"{cfg.method.name} | {cfg.backbone.name} | {datamodule_name(cfg)}"
    rows = "\n".join(f"  {key:<20} {value:>10.4f}" for key, value in metrics.items())
    print(f"\n{title}\n{rows}\n  outputs: {output_dir}\n", flush=True)


def datamodule_name(cfg: DictConfig) -> str:
    return str(cfg.dataset.get("category") or Path(cfg.dataset.root).name)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is noise
    try:
        metrics = train(cfg)
    except Exception as error:
        end_wandb_run(exit_code=1)
        record_failure(Path(cfg.paths.output_dir), error)
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            raise
        # a sweep goes on; CollectResults lists the failure and exits non-zero at the end
        log.exception("Run failed: %s", cfg.paths.output_dir)
        return None
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
