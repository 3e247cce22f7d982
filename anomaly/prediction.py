"""Scoring new images with a fitted model, as on a production line: a CSV row per input file, overlays,
and a summary of the batch against the calibration.

:func:`predict_folder` writes ``predictions.csv`` (path, image score, normalised score, is_anomalous,
error; every file of the input that is not an image, or a sub-folder, gets a row saying why it was not
used), per image a heatmap overlay and a binary defect mask (the calibrated pixel threshold), and
``summary.json`` (the share above the threshold, and whether the batch's scores drifted from the
calibration's). An unreadable file is reported by name (CSV and log) and the rest are scored; if nothing
could be scored it is a DataError. Images of another size or channel count go through the training
preprocessing. The model file loads without the training data and without executing code.
"""

import csv
import glob
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from anomaly.calibration import Calibration, drift
from anomaly.data.dataset import ImageDataset
from anomaly.data.decode import IMAGE_EXTENSIONS
from anomaly.data.samples import Sample, SkippedFile, describe_skipped, list_images
from anomaly.errors import DataError
from anomaly.methods.base import score_batches
from anomaly.model_io import LoadedModel, load_model
from anomaly.visualization import save_prediction

log = logging.getLogger(__name__)
CSV_HEADER = ["path", "image_score", "normalised_score", "is_anomalous", "error"]


@dataclass(frozen=True)
class PredictionResult:
    csv_path: Path  # predictions.csv: one row per input file
    summary_path: Path  # summary.json: the counts, the threshold and the drift test
    summary: dict  # what summary.json holds
    scored: int  # images scored
    anomalous: int | None  # scored images above the image threshold; None without a threshold
    unreadable: int  # image files that could not be read (each has its CSV row and log line)
    not_used: int  # files of the input that are not images, or sub-folders (each has its CSV row)


def resolve_inputs(spec: str) -> tuple[list[Path], list[SkippedFile]]:
    """An image file, a folder (its images, sorted) or a glob pattern → (image paths, what was found and
    not used, with the reason: the same rules as anomaly-train's listing)."""
    path = Path(spec).expanduser()
    skipped: list[SkippedFile] = []
    if path.is_dir():
        folders = "folder (input= reads one folder: pass the sub-folder, or a glob such as 'dir/**/*.png')"
        paths = list_images(path, skipped, sub_folders=folders)
    elif path.is_file():
        paths = [path] if path.suffix.lower() in IMAGE_EXTENSIONS else []
        skipped = [] if paths else [SkippedFile(path, f"not an image extension ({path.suffix or 'none'})")]
    else:
        paths = []
        for match in sorted(Path(p) for p in glob.glob(str(path), recursive=True)):
            if match.is_dir():
                continue  # a glob's folders are the way to its files, not inputs
            if match.suffix.lower() in IMAGE_EXTENSIONS and not match.name.startswith("."):
                paths.append(match)
            else:
                skipped.append(SkippedFile(match, "not an image extension or hidden"))
    if not paths:
        found = f" Found {describe_skipped(skipped)}." if skipped else ""
        raise DataError(f"No images found for input={spec!r}: give an image, a folder or a glob.{found}")
    return paths, skipped


def predict_folder(
    model: LoadedModel | str | Path,
    inputs: str,
    output_dir: Path,
    *,
    threshold: float | None,
    pixel_threshold: float | None,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    save_overlays: bool,
    drift_alpha: float,
) -> PredictionResult:
    """Scores every image of ``inputs`` (:func:`resolve_inputs`) with ``model`` (a loaded model already
    on ``device``, or a run dir or model file to load there) and writes the CSV, the overlays (if
    ``save_overlays``) and the summary into ``output_dir``. ``threshold`` and ``pixel_threshold`` override
    the calibrated ones (None: the model's); ``drift_alpha`` is the drift test's significance level.
    Raises DataError if no image could be scored."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device)
    if threshold is None:
        threshold = getattr(loaded.calibration, "threshold", None)
    if pixel_threshold is None:
        pixel_threshold = getattr(loaded.calibration, "pixel_threshold", threshold)
    if threshold is None:
        log.warning("The model has no calibrated threshold (trained with dataset.calibration_fraction=0) and "
                    "threshold= was not given: is_anomalous and masks are left empty.")  # fmt: skip
    paths, skipped = resolve_inputs(inputs)
    if skipped:
        log.warning("%s", describe_skipped(skipped))
    samples = [Sample(path, 0, None, "new") for path in paths]
    dataset = ImageDataset(samples, loaded.preprocessing.transform(), with_masks=False, keep_errors=True)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_path = output_dir / "predictions.csv"
    failures = 0
    scores: list[float] = []
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_HEADER)
        writer.writerows([str(file.path), "", "", "", f"not used: {file.reason}"] for file in skipped)

        def readable_batches() -> Iterator[dict]:
            """The batches with an image; each unreadable file gets its CSV row and log line."""
            nonlocal failures
            for batch in tqdm(loader, desc="Predicting", unit="batch"):
                for path, error in batch["failed"]:
                    log.error("Skipped %s: %s", path, error)
                    writer.writerow([path, "", "", "", error])
                    failures += 1
                if batch["image"] is not None:
                    yield batch

        for batch, output in score_batches(loaded.model, readable_batches(), device):
            for i, path in enumerate(batch["path"]):
                score = float(output.image_score[i])
                scores.append(score)
                writer.writerow(prediction_row(path, score, loaded.calibration, threshold))
                if save_overlays:
                    stem = output_dir / "images" / f"{len(scores):05d}_{Path(path).stem}"
                    heat = output.anomaly_map[i, 0].float().cpu()
                    save_prediction(batch["image"][i].cpu(), heat, score, threshold, pixel_threshold, stem)
    scored = len(scores)
    log.info("Scored %d images (%d unreadable, %d not used) → %s", scored, failures, len(skipped), csv_path)
    if scored == 0:
        raise DataError(f"None of the {failures} input image(s) could be read: see {csv_path}.")
    summary = {"images": scored, "unreadable": failures, "not_used": len(skipped), "threshold": threshold}
    # (a calibration without its scores, as an older or hand-made model file may hold, has no drift test)
    if loaded.calibration is not None and (moved := drift(torch.tensor(scores), loaded.calibration)):
        summary |= moved
        summary["drift_detected"] = summary["drift_p_value"] < drift_alpha
        log_drift(summary, drift_alpha)
    summary_path = output_dir / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    anomalous = None if threshold is None else sum(score > threshold for score in scores)
    return PredictionResult(csv_path, summary_path, summary, scored, anomalous, failures, len(skipped))


def collate(items: list[dict]) -> dict:
    """The readable images as a batch (``"image"`` ``[B, 3, H, W]`` or None, ``"path"``), and the
    unreadable ones as ``"failed"`` (path, error) pairs."""
    readable = [item for item in items if "image" in item]
    return {
        "image": torch.stack([item["image"] for item in readable]) if readable else None,
        "path": [item["path"] for item in readable],
        "failed": [(item["path"], item["error"]) for item in items if "error" in item],
    }


def prediction_row(path: str, score: float, calibration: Calibration | None, threshold: float | None) -> list:
    """One CSV row; the normalised score needs a calibration, the verdict a threshold."""
    normalised = f"{float(calibration.normalise(torch.tensor(score))):.4f}" if calibration else ""
    anomalous = "" if threshold is None else int(score > threshold)
    return [path, f"{score:.6g}", normalised, anomalous, ""]


def log_drift(summary: dict, alpha: float) -> None:
    """The batch's share above threshold, and a warning when its scores moved from the calibration ones."""
    message = (
        f"{100 * summary['share_above_threshold']:.1f} % of the {summary['images']} images above the "
        "threshold; "
        f"scores against the calibration's: Kolmogorov-Smirnov {summary['drift_ks_statistic']:.3f}, "
        f"p = {summary['drift_p_value']:.3g}"
    )
    if summary["drift_detected"]:
        advice = "If these are good parts, the line has changed (light, camera, material): check it."
        log.warning("%s: the scores have moved (p < %g). %s", message, alpha, advice)
    else:
        log.info("%s: no drift detected (p >= %g).", message, alpha)
