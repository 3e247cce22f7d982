"""Small defects in large images: a run at 256 px against a tiled run at full resolution.

Generates the ``specks`` category (woven fabric with dark particles 3-6 px across) at 1024 px, fits
PatchCore twice (images resized to 256 px; the same images at 1024 px as 16 tiles of 256 px, one shared
memory bank; ``--size`` scales both) and measures both against the 1024-px masks
(:mod:`anomaly.metrics.full_resolution`). Prints the table and writes the README figure (one defective
image, its mask, both maps, zoomed on a defect). PatchCore keeps 1% of the patches in both runs, which
the paper also reports, to bound the time of the greedy coreset over 16 times as many patches.

    python scripts/small_defects_demo.py --out outputs/small_defects  # ~10 min on 2 CPU cores
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torchvision import tv_tensors

import anomaly
from anomaly.cli.runtime import prepare_process
from anomaly.data.decode import read_image
from anomaly.data.synthetic import SyntheticAD
from anomaly.metrics.full_resolution import full_resolution_metrics, mask_of
from anomaly.model_io import load_model

SHOWN = ("image_auroc", "pixel_auroc", "pixel_aupro", "regions_detected_at_threshold")


def fit(out: Path, name: str, size: int, overrides: list[str]) -> Path:
    """anomaly-train's job (:func:`anomaly.run`) into ``out/name``; returns the run dir."""
    data = ["dataset.category=specks", f"dataset.generated_size={size}", "dataset.n_train=40",
            "dataset.n_calibration=0",
            "dataset.n_test_good=20", "dataset.n_test_defect=30", "dataset.calibration_fraction=0.25",
            "dataset.batch_size=8", "method=patchcore", "method.model.coreset_ratio=0.01",
            "logger=csv", f"paths.data_dir={out / 'data'}", "paths.results_db=null"]  # fmt: skip
    cfg = anomaly.compose([*data, *overrides], output_dir=out / name)
    prepare_process(cfg.reuse_freed_memory, cfg.get("num_threads"))  # as anomaly-train does
    result = anomaly.run(cfg)
    print(result.describe(), flush=True)
    return result.output_dir


def figure(runs: dict[str, Path], sample, path: Path) -> None:
    """The image, its mask and each run's map at full resolution, then the same zoomed on a defect."""
    image = read_image(sample.image_path)
    height, width = image.shape[-2:]
    mask = mask_of(sample, (width, height))[0].numpy()
    maps = {}
    for name, run_dir in runs.items():
        loaded = load_model(run_dir)
        inputs = loaded.preprocessing.transform()(tv_tensors.Image(image)).as_subclass(torch.Tensor)[None]
        with torch.no_grad():
            anomaly_map = loaded.model(inputs).anomaly_map.float()
        maps[name] = F.interpolate(anomaly_map, size=(height, width), mode="bilinear")[0, 0].numpy()
    rows, cols = np.nonzero(mask)
    centre = int(rows[0]), int(cols[0])  # a pixel of the first defect
    zoom = tuple(slice(max(c - 64, 0), max(c - 64, 0) + 128) for c in centre)
    panels = [("image", image.permute(1, 2, 0).numpy(), None), ("mask", mask, "gray")]
    panels += [(f"map: {name}", values, "jet") for name, values in maps.items()]
    plot = Figure(figsize=(3 * len(panels), 6))
    axes = plot.subplots(2, len(panels))
    for column, (title, values, colours) in enumerate(panels):
        for row, region in enumerate((np.s_[:, :], zoom)):
            axis = axes[row, column]
            axis.imshow(values[region], cmap=colours)
            axis.set_axis_off()
            axis.set_title(title if row == 0 else f"{title} (128-px zoom)", fontsize=9)
    plot.tight_layout()
    plot.savefig(path, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/small_defects"))
    parser.add_argument("--size", type=int, default=1024, help="generated image side (a multiple of 256)")
    parser.add_argument("--figure", type=Path, default=Path("docs/images/small_defects.png"))
    args = parser.parse_args()
    tile = args.size // 4  # the resized run's side, and the tiled run's tile side
    runs, seconds = {}, {}
    for name, overrides in (
        (f"resized to {tile} px", [f"dataset.image_size={tile}"]),
        (
            f"tiled, {tile}-px tiles",
            [f"dataset.image_size=[{args.size},{args.size}]", f"tiling.tile_size={tile}"],
        ),
    ):
        start = time.perf_counter()
        runs[name] = fit(args.out, name.split(",")[0].split(" ")[0], args.size, overrides)
        seconds[name] = time.perf_counter() - start
    data = SyntheticAD(str(args.out / "data" / "synthetic"), "specks", n_train=40, n_test_good=20,
                       n_test_defect=30, generated_size=args.size, image_size=args.size)  # fmt: skip
    samples = data.load_samples().test
    print(f"\nspecks at {args.size} px, PatchCore (Lite0), measured against the {args.size}-px masks")
    print("| run | " + " | ".join(SHOWN) + " | fit + test s |\n|---|" + "---|" * (len(SHOWN) + 1))
    for name, run_dir in runs.items():
        loaded = load_model(run_dir)
        metrics = full_resolution_metrics(
            loaded.model, loaded.preprocessing, samples, pixel_threshold=loaded.calibration.pixel_threshold
        )
        print(
            f"| {name} | " + " | ".join(f"{metrics[key]:.3f}" for key in SHOWN) + f" | {seconds[name]:.0f} |"
        )
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    figure(runs, next(s for s in samples if s.label == 1), args.figure)
    print(f"\nFigure: {args.figure}")


if __name__ == "__main__":
    main()
