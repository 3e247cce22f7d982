"""Where the time goes: decode, backbone, fit, scoring and metrics of one method on one data set.

Runs the same composed config as ``anomaly-train`` (any Hydra override works) and prints a table:

* ``decode``: reading and resizing every train and test image (the data loaders alone);
* ``backbone``: the backbone forward over all those images, already decoded, as the methods run it
  (BatchNorms folded into the convolutions); decode + backbone is the *floor*: what any method on
  this backbone must pay;
* ``unfolded_backbone``: the same forward through the network as published (BatchNorms not folded);
  decode + it is the ``reference_floor`` (``scripts/benchmark_floor.py`` gives the conventional floor
  of ../shared/peer/RESULTS.md: PIL decoding, this network, glibc's default malloc settings);
* ``collect``, ``fit``: the method's pass over the training images and its fit (statistics or coreset);
* ``score``, ``metrics``: the test forward pass and the metric computation;
* ``end_to_end``: ``anomaly-train``'s own fit + test seconds (imports and process start excluded, as
  in anomalib's figures), from a separate full run with the logger off.

Trained methods (SimpleNet, EfficientAD) have no collect/fit stages; for them the table gives instead:

* ``train_step_ms``: median time of one optimiser step (data loading excluded) over ``--train-steps``
  Lightning steps after ``--warmup`` untimed ones, at the configured batch size;
* ``latency_ms``: median forward time of one test image (batch 1), after ``--warmup`` untimed ones;
* ``throughput_ips``: test images per second at the configured batch size.

Peak RSS is this process's (GPU peak memory too, when on CUDA). ``--compare-peer`` also runs anomalib
through ``../shared/peer`` on the same data and prints the ratios. ``--seeds 0 1 2`` instead runs the whole
job (and, with ``--compare-peer``, anomalib's) once per seed and prints each metric as mean ± sample std on
each side with the difference of the means: a single seed cannot tell a 0.01 gap from seed noise (PaDiM's
channel choice, PatchCore's projection and starting points). Example::

    python scripts/benchmark_stages.py --json bench.json -- dataset=mvtec \\
        dataset.root=../shared/data/mvtec_ad dataset.category=bottle dataset.image_size=[256,256] \\
        dataset.crop_size=null method=padim
    python scripts/benchmark_stages.py --skip-end-to-end -- method=efficientad \\
        method.model.teacher_weights=outputs/teachers/teacher_small_efficientnet_lite0.pth
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

import anomaly
from anomaly.backbones import FeatureExtractor
from anomaly.cli.runtime import prepare_process
from anomaly.data.datamodule import AnomalyDataModule
from anomaly.experiment import build_model, check_settings, lightning_notes_silenced, peak_rss_mb, tiling_of
from anomaly.methods.base import FitOnceModel, RunResources, TrainedModel
from anomaly.methods.patchcore.model import PatchCore
from anomaly.metrics import Evaluator


class Stopwatch:
    """Collects named durations in seconds: ``with watch("fit"): ...`` (the GPU's queue drained first)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        synchronize()
        start = time.perf_counter()
        yield
        synchronize()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def run_end_to_end(cfg: DictConfig) -> dict[str, float]:
    """``anomaly-train``'s job (:func:`anomaly.run`) on ``cfg``; prints its summary, returns its metrics."""
    result = anomaly.run(cfg)
    if result.record is not None:
        print(result.describe(), flush=True)
    return result.metrics


def datamodule_of(cfg: DictConfig) -> AnomalyDataModule:
    """The data module as a run builds it for the configured method (:func:`anomaly.experiment.run`)."""
    model_class = get_class(cfg.method.model._target_)
    normalization_share = model_class.normalization_share if issubclass(model_class, TrainedModel) else 0.0
    return instantiate(
        cfg.dataset,
        train_in_order=issubclass(model_class, FitOnceModel),
        normalization_share=normalization_share,
    )


def stage_device(cfg) -> torch.device:
    """Where the stages run: the GPU when there is one and the config does not ask for the CPU."""
    use_gpu = torch.cuda.is_available() and cfg.trainer.accelerator != "cpu"
    return torch.device("cuda" if use_gpu else "cpu")


def time_stages(cfg) -> dict[str, float]:
    """Runs each stage separately on the composed config; returns seconds per stage."""
    check_settings(cfg)
    torch.manual_seed(cfg.seed)
    device = stage_device(cfg)
    watch = Stopwatch()
    datamodule = datamodule_of(cfg)
    datamodule.setup()
    with watch("decode"):  # and the copy to the device, as the loaders deliver batches
        train_batches = [batch["image"].to(device) for batch in datamodule.train_dataloader()]
        test_batches = [
            {**batch, "image": batch["image"].to(device)} for batch in datamodule.test_dataloader()
        ]
    model = build_model(cfg, tiling_of(cfg, datamodule.preprocessing), uncached(cfg)).to(device).eval()
    all_images = [*train_batches, *(batch["image"] for batch in test_batches)]
    backbone = next(module for module in model.modules() if isinstance(module, FeatureExtractor))
    with torch.inference_mode(), watch("backbone"):
        for images in all_images:
            backbone(images)
    unfolded = instantiate(cfg.backbone, fold_batch_norms=False).to(device)
    with torch.inference_mode(), watch("unfolded_backbone"):
        for images in all_images:
            unfolded(images)
    del unfolded
    with torch.inference_mode(), watch("collect"):
        for images in train_batches:
            model.collect(images)
    with torch.inference_mode(), watch("fit"):
        model.fit()
    if isinstance(model, PatchCore):  # the test patches' nearest-neighbour search alone
        with torch.inference_mode():
            patches = [model.embed(batch["image"]).flatten(0, 1) for batch in test_batches]
            with watch("knn"):
                for queries in patches:
                    model._knn_index().search(queries, model.num_neighbors)
    settings = cfg.evaluation  # as the run's test step sets it up
    evaluator = Evaluator(datamodule.has_pixel_ground_truth(), settings.aupro_fpr_limit,
                          settings.exact_pixel_limit, settings.histogram_bins)  # fmt: skip
    with torch.inference_mode():
        for batch in test_batches:
            with watch("score"):
                output = model(batch["image"])
            with watch("metrics"):
                evaluator.update(output.image_score, batch["label"], output.anomaly_map, batch["mask"])
    with watch("metrics"):
        metrics = evaluator.compute()
    return {
        **{f"{k}_s": round(v, 2) for k, v in watch.seconds.items()},
        "floor_s": round(watch.seconds["decode"] + watch.seconds["backbone"], 2),
        "reference_floor_s": round(watch.seconds["decode"] + watch.seconds["unfolded_backbone"], 2),
        "n_train": len(datamodule.train_samples),
        "n_test": len(datamodule.test_samples),
        "device": device.type,
        **{f"stages_{k}": round(v, 4) for k, v in metrics.items()},
    }


class StepTimer(pl.Callback):
    """Seconds of each training step, from batch start to batch end (the data loader's time excluded).

    Stops training after ``steps`` batches: Lightning's ``max_steps`` counts optimiser steps, two per
    batch for SimpleNet.
    """

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.seconds: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        synchronize()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        synchronize()
        self.seconds.append(time.perf_counter() - self.start)
        if len(self.seconds) >= self.steps:
            trainer.should_stop = True


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_ms(seconds: list[float]) -> float:
    return round(1000 * statistics.median(seconds), 2)


def uncached(cfg: DictConfig) -> RunResources:
    """The run's spill folder and no feature cache: the stages are timed as computed."""
    return RunResources(spill_dir=cfg.paths.get("spill_dir"))


def time_trained_stages(cfg, train_steps: int, warmup: int) -> dict[str, float]:
    """Training step time, then batch-1 latency and batched throughput of the briefly trained model."""
    check_settings(cfg)
    pl.seed_everything(cfg.seed)
    datamodule = datamodule_of(cfg)
    datamodule.setup()  # every file listed and checked before any work, as a run does
    model = build_model(cfg, tiling_of(cfg, datamodule.preprocessing), uncached(cfg))
    module = instantiate(cfg.method.module, model=model)
    steps = warmup + train_steps
    timer = StepTimer(steps)
    trainer = instantiate(
        cfg.trainer, max_steps=-1, max_epochs=-1, logger=False, callbacks=[timer], enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    with lightning_notes_silenced():  # as a run does
        trainer.fit(module, datamodule=datamodule)  # finalize() after the last step: EfficientAD's quantiles
    if len(timer.seconds) < steps:
        raise ValueError(f"Only {len(timer.seconds)} training steps ran; {steps} were asked for.")
    device = next(model.parameters()).device
    model.eval()
    test_images = torch.cat([batch["image"] for batch in datamodule.test_dataloader()])
    latencies, throughput_seconds = [], []
    with torch.inference_mode():
        for index in range(min(len(test_images), warmup + 50)):
            synchronize()
            start = time.perf_counter()
            model(test_images[index : index + 1].to(device))
            synchronize()
            latencies.append(time.perf_counter() - start)
        for batch in test_images.split(datamodule.batch_size):
            synchronize()
            start = time.perf_counter()
            model(batch.to(device))
            synchronize()
            throughput_seconds.append(time.perf_counter() - start)
    return {
        "batch_size": datamodule.batch_size,
        "train_step_ms": median_ms(timer.seconds[warmup:]),
        "latency_ms": median_ms(latencies[warmup:]),
        "throughput_ips": round(len(test_images) / sum(throughput_seconds), 1),
        "n_train": len(datamodule.train_samples),
        "n_test": len(test_images),
    }


def run_peer(args: argparse.Namespace, cfg) -> dict:
    """anomalib on the same data, backbone, size and layers, through the shared peer runner."""
    layers = list(cfg.backbone.layers)
    command = [
        args.peer_python, str(Path(args.peer_dir) / "run_anomalib.py"),
        "--data-root", args.peer_data_root or str(cfg.dataset.root), "--category", str(cfg.dataset.category),
        "--model", cfg.method.name, "--backbone", "tf_efficientnet_lite0", "--layers", *layers,
        "--image-size", str(args.peer_image_size), "--threads", str(torch.get_num_threads()),
        "--seed", str(cfg.seed),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=args.peer_dir, capture_output=True, text=True)
    if result.returncode != 0:  # our figures still get printed and written; the peer's error is shown
        print(result.stderr[-3000:], file=sys.stderr)
        raise RuntimeError(f"anomalib's runner failed (exit {result.returncode}): {' '.join(command)}")
    return json.loads(result.stdout[result.stdout.index("{") :])


def peer_figures(peer: dict, end_to_end_s: float | None) -> dict:
    """The peer's time, memory and metrics, and our end-to-end time over its time."""
    figures = {
        "peer_fit_plus_test_s": round(peer["fit_s"] + peer["test_s"], 2),
        "peer_peak_rss_mb": peer.get("peak_rss_mb"),
        "peer_image_auroc": peer["image_AUROC"],
        "peer_pixel_auroc": peer["pixel_AUROC"],
        "peer_aupro": peer["AUPRO"],
    }
    if end_to_end_s is not None:
        figures["ours_over_peer"] = round(end_to_end_s / figures["peer_fit_plus_test_s"], 3)
    return figures


SEED_METRICS = {  # ours -> the peer runner's name
    "image_auroc": "image_AUROC",
    "pixel_auroc": "pixel_AUROC",
    "pixel_aupro": "AUPRO",
    "fit_plus_test_s": None,
}


def compare_seeds(args: argparse.Namespace, overrides: list[str], output_dir: Path) -> dict:
    """The whole job per seed, ours and (``--compare-peer``) anomalib's: mean ± std per side and metric."""
    ours, peer = [], []
    for seed in args.seeds:
        cfg = anomaly.compose([*overrides, f"seed={seed}"], output_dir / f"seed{seed}")
        metrics = run_end_to_end(cfg)
        ours.append({**metrics, "fit_plus_test_s": metrics["fit_seconds"] + metrics["test_seconds"]})
        if args.compare_peer:
            result = run_peer(args, cfg)
            peer.append({**result, "fit_plus_test_s": result["fit_s"] + result["test_s"]})
        print(f"seed {seed}: ours " + ", ".join(f"{k} {ours[-1][k]:.4f}" for k in SEED_METRICS), flush=True)
    figures: dict = {"seeds": " ".join(map(str, args.seeds))}
    for metric, peer_name in SEED_METRICS.items():
        mine = [run[metric] for run in ours]
        figures[f"{metric} ours"] = spread(mine)
        if peer:
            theirs = [run[peer_name or metric] for run in peer]
            figures[f"{metric} anomalib"] = spread(theirs)
            figures[f"{metric} ours - anomalib"] = f"{statistics.mean(mine) - statistics.mean(theirs):+.4f}"
    return figures


def spread(values: list[float]) -> str:
    """Mean ± sample std (± 0 for one value)."""
    deviation = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {deviation:.4f}"


def print_table(rows: dict[str, float | str]) -> None:
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        shown = f"{value:10.3f}" if isinstance(value, float) else f"{value!s:>10}"
        print(f"  {key:<{width}} {shown}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for anomaly-train")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--skip-end-to-end", action="store_true", help="stages only, no full anomaly-train run"
    )
    parser.add_argument("--compare-peer", action="store_true", help="also run anomalib via ../shared/peer")
    parser.add_argument("--peer-dir", default="../shared/peer", help="folder with run_anomalib.py")
    parser.add_argument("--peer-python", default="python3", help="the Python of the peer's venv")
    parser.add_argument("--peer-image-size", type=int, default=256)
    parser.add_argument(
        "--peer-data-root", help="data root for anomalib if not ours (its loader reads only .png images)"
    )
    parser.add_argument("--train-steps", type=int, default=20, help="timed steps (trained methods)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps and images first")
    parser.add_argument("--seeds", type=int, nargs="+", help="whole runs per seed, mean ± std (no stages)")
    args = parser.parse_args()

    output_dir = Path("outputs/benchmarks") / time.strftime("%Y-%m-%d_%H-%M-%S")
    overrides = [*args.overrides, "logger=none", "trainer.enable_progress_bar=false"]
    cfg = anomaly.compose(overrides, output_dir)
    # as anomaly-train does (malloc, threads), so that every stage and run sees the same process settings
    prepare_process(cfg.reuse_freed_memory, cfg.get("num_threads"))
    if args.seeds:
        figures = compare_seeds(args, overrides, output_dir)
        print(f"\n{cfg.method.name} | {cfg.backbone.name} | {cfg.dataset.get('category')} over seeds")
        print_table(figures)
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
        return
    figures: dict = {
        "method": cfg.method.name,
        "backbone": cfg.backbone.name,
        "threads": torch.get_num_threads(),
    }
    if not args.skip_end_to_end:  # first, so that its peak RSS is its own
        metrics = run_end_to_end(anomaly.compose(overrides, output_dir / "end_to_end"))
        figures["end_to_end_s"] = round(metrics["fit_seconds"] + metrics["test_seconds"], 2)
        figures.update({k: v for k, v in metrics.items() if not k.endswith("seconds")})
    if issubclass(get_class(cfg.method.model._target_), FitOnceModel):
        figures.update(time_stages(cfg))
    else:
        figures.update(time_trained_stages(cfg, args.train_steps, args.warmup))
    figures.setdefault("peak_rss_mb", round(peak_rss_mb(), 1))  # the end-to-end run's, when it ran
    if torch.cuda.is_available():
        figures["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if "floor_s" in figures and "end_to_end_s" in figures:
        figures["end_to_end_over_floor"] = round(figures["end_to_end_s"] / figures["floor_s"], 2)
        figures["end_to_end_over_reference_floor"] = round(
            figures["end_to_end_s"] / figures["reference_floor_s"], 2
        )
    if args.compare_peer:
        try:
            figures.update(peer_figures(run_peer(args, cfg), figures.get("end_to_end_s")))
        except RuntimeError as error:  # our figures are still printed and written
            figures["peer_error"] = str(error)
    print(f"\n{cfg.method.name} | {cfg.backbone.name} | {cfg.dataset.get('category')} (seconds, MB)")
    print_table(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
