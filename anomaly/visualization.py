"""Heatmap figures: image | ground truth | anomaly map over the image."""

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image
from torch import Tensor


def save_heatmap(example: dict, path: Path, vmin: float, vmax: float) -> Path:
    """Saves one example (as kept by the Lightning module) as a three-panel PNG.

    ``vmin``/``vmax`` fix the colour scale across all figures of a run, so that a normal image
    does not look anomalous just because its own map was stretched to the full range.
    """
    image = _hwc(example["image"])
    figure = Figure(figsize=(9, 3.2))
    axes = figure.subplots(1, 3)
    axes[0].imshow(image)
    axes[0].set_title("good" if example["label"] == 0 else "defective", fontsize=9)
    axes[1].imshow(example["mask"][0].numpy(), cmap="gray", vmin=0, vmax=1)
    axes[1].set_title("ground truth", fontsize=9)
    axes[2].imshow(image)
    axes[2].imshow(example["anomaly_map"][0].numpy(), cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)
    axes[2].set_title(f"score {example['score']:.3g}", fontsize=9)
    for axis in axes:
        axis.axis("off")
    figure.suptitle(Path(example["path"]).name, fontsize=8)
    # fixed margins: tight_layout measured every text of every figure (~0.1 s of ~0.3 s per figure)
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.84, wspace=0.04)
    figure.savefig(path, dpi=80)
    return path


def save_heatmaps(examples: list[dict], folder: Path) -> list[Path]:
    """Writes every example to ``folder`` with one colour scale: from the lowest map value to the
    median image score of the examples, so that strong defects saturate rather than washing out
    the weaker ones. (Visual only; no score is changed.)"""
    if not examples:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    vmin = min(float(e["anomaly_map"].min()) for e in examples)
    vmax = float(np.median([e["score"] for e in examples]))
    return [
        save_heatmap(
            e,
            folder / f"{i:02d}_{e['label']}_{Path(e['path']).parent.name}_{Path(e['path']).stem}.png",
            vmin,
            vmax,
        )
        for i, e in enumerate(examples)
    ]


def _hwc(image: Tensor):
    return image.permute(1, 2, 0).clamp(0, 1).numpy()


def save_prediction(
    image: Tensor,
    anomaly_map: Tensor,
    score: float,
    threshold: float | None,
    pixel_threshold: float | None,
    stem: Path,
) -> None:
    """``<stem>_overlay.png`` (image | heatmap, saturated red at the pixel threshold) and, with a pixel
    threshold, ``<stem>_mask.png``: the defect mask ``map > pixel_threshold`` at the evaluated resolution."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    heat = anomaly_map.numpy()
    vmin = float(heat.min())
    top = pixel_threshold if pixel_threshold is not None else float(heat.max())
    figure = Figure(figsize=(6, 3.2))
    axes = figure.subplots(1, 2)
    axes[0].imshow(_hwc(image))
    axes[1].imshow(_hwc(image))
    axes[1].imshow(heat, cmap="jet", alpha=0.5, vmin=vmin, vmax=max(top, vmin + 1e-6))
    verdict = "" if threshold is None else (" ANOMALOUS" if score > threshold else " ok")
    axes[1].set_title(f"score {score:.3g}{verdict}", fontsize=9)
    for axis in axes:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(f"{stem}_overlay.png", dpi=80)
    if pixel_threshold is not None:
        Image.fromarray(((heat > pixel_threshold) * 255).astype(np.uint8)).save(f"{stem}_mask.png")
