"""Where the time goes: decode, backbone, fit, scoring and metrics of one method on one data set.

Runs the same composed config as ``anomaly-train`` (any Hydra override works) and prints a table:

* ``decode``: reading and resizing every train and test image (the data loaders alone);
* ``backbone``: the backbone forward over all those images, already decoded;
  decode + backbone is the *floor*: what any method on this backbone must pay;
* ``collect``, ``fit``: the method's pass over the training images and its fit (statistics or coreset);
* ``score``, ``metrics``: the test forward pass and the metric computation;
* ``end_to_end``: ``anomaly-train``'s own fit + test seconds (imports and process start excluded, as
  in anomalib's figures), from a separate full run with the logger off.

Peak RSS is this process's. ``--compare-peer`` also runs anomalib through ``../shared/peer`` on the
same data and prints the ratios. Example::

    python scripts/benchmark_stages.py --json bench.json -- dataset=mvtec \\
        dataset.root=../shared/data/mvtec_ad dataset.category=bottle dataset.image_size=[256,256] \\
        dataset.crop_size=null method=padim
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

from anomaly.metrics import Evaluator
from anomaly.train import CONFIG_DIR, train


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Stopwatch:
    """Collects named durations in seconds: ``with watch("fit"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def compose_config(overrides: list[str], output_dir: Path):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.root_dir = str(Path.cwd())
        cfg.paths.data_dir = str(Path.cwd() / "outputs" / "data")
        del cfg.hydra
    return cfg


def time_stages(cfg) -> dict[str, float]:
    """Runs each stage separately on the composed config; returns seconds per stage."""
    torch.manual_seed(cfg.seed)
    watch = Stopwatch()
    datamodule = instantiate(cfg.dataset)
    datamodule.setup()
    with watch("decode"):
        train_batches = [batch["image"] for batch in datamodule.train_dataloader()]
        test_batches = list(datamodule.test_dataloader())
    model = instantiate(cfg.method.model).eval()
    with torch.inference_mode(), watch("backbone"):
        for images in [*train_batches, *(batch["image"] for batch in test_batches)]:
            model.backbone(images)
    with torch.inference_mode(), watch("collect"):
        for images in train_batches:
            model.collect(images)
    with torch.inference_mode(), watch("fit"):
        model.fit()
    evaluator = Evaluator(compute_pixel_metrics=datamodule.has_pixel_ground_truth())
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
        "n_train": len(datamodule.train_samples),
        "n_test": len(datamodule.test_samples),
        **{f"stages_{k}": round(v, 4) for k, v in metrics.items()},
    }


def run_peer(args: argparse.Namespace, cfg) -> dict:
    """anomalib on the same data, backbone, size and layers, through the shared peer runner."""
    layers = list(cfg.backbone.layers)
    command = [
        args.peer_python, str(Path(args.peer_dir) / "run_anomalib.py"),
        "--data-root", str(cfg.dataset.root), "--category", str(cfg.dataset.category),
        "--model", cfg.method.name, "--backbone", "tf_efficientnet_lite0", "--layers", *layers,
        "--image-size", str(args.peer_image_size), "--threads", str(torch.get_num_threads()),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=args.peer_dir, capture_output=True, text=True, check=True)
    return json.loads(result.stdout[result.stdout.index("{") :])


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
    args = parser.parse_args()

    output_dir = Path("outputs/benchmarks") / time.strftime("%Y-%m-%d_%H-%M-%S")
    overrides = [*args.overrides, "logger=none", "trainer.enable_progress_bar=false"]
    cfg = compose_config(overrides, output_dir)
    figures: dict = {
        "method": cfg.method.name,
        "backbone": cfg.backbone.name,
        "threads": torch.get_num_threads(),
    }
    if not args.skip_end_to_end:  # first, so that its peak RSS is its own
        metrics = train(compose_config(overrides, output_dir / "end_to_end"))
        figures["end_to_end_s"] = round(metrics["fit_seconds"] + metrics["test_seconds"], 2)
        figures.update({k: v for k, v in metrics.items() if not k.endswith("seconds")})
    figures.update(time_stages(cfg))
    if "end_to_end_s" in figures:
        figures["end_to_end_over_floor"] = round(figures["end_to_end_s"] / figures["floor_s"], 2)
    if args.compare_peer:
        peer = run_peer(args, cfg)
        figures["peer_fit_plus_test_s"] = round(peer["fit_s"] + peer["test_s"], 2)
        figures["peer_peak_rss_mb"] = peer.get("peak_rss_mb")
        figures["peer_image_auroc"], figures["peer_pixel_auroc"] = peer["image_AUROC"], peer["pixel_AUROC"]
        figures["peer_aupro"] = peer["AUPRO"]
        if "end_to_end_s" in figures:
            figures["ours_over_peer"] = round(figures["end_to_end_s"] / figures["peer_fit_plus_test_s"], 3)
    print(f"\n{cfg.method.name} | {cfg.backbone.name} | {cfg.dataset.get('category')} (seconds, MB)")
    print_table(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
