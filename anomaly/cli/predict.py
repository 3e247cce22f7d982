"""``anomaly-predict``: score new images with a fitted model, as on a production line.

Writes ``predictions.csv`` (path, image score, normalised score, is_anomalous, error; every file of
the input that is not an image, or a sub-folder, gets a row saying why it was not used), per image a
heatmap overlay and a binary defect mask (the calibrated pixel threshold), and ``summary.json`` (the
share above the threshold, and whether the batch's scores drifted from the calibration's), into its own
output dir. An unreadable file is reported by
name (CSV and log) and the rest are scored; if nothing could be scored the command fails. Images of
another size or channel count go through the training preprocessing. The model file loads without the
training data and without executing code.
"""

import csv
import glob
import json
import logging
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from tqdm import tqdm

from anomaly.calibration import Calibration, drift
from anomaly.cli.runtime import CONFIG_PATH, prepare_process, report_user_errors
from anomaly.data.dataset import ImageDataset
from anomaly.data.decode import IMAGE_EXTENSIONS
from anomaly.data.samples import Sample, SkippedFile, describe_skipped, list_images
from anomaly.errors import DataError
from anomaly.methods.base import check_finite
from anomaly.model_io import load_model
from anomaly.visualization import save_prediction

log = logging.getLogger(__name__)


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


def collate(items: list[dict]) -> dict:
    readable = [item for item in items if "image" in item]
    return {
        "images": torch.stack([item["image"] for item in readable]) if readable else None,
        "paths": [item["path"] for item in readable],
        "failed": [(item["path"], item["error"]) for item in items if "error" in item],
    }


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def prediction_row(path: str, score: float, calibration: Calibration | None, threshold: float | None) -> list:
    """One CSV row; the normalised score needs a calibration, the verdict a threshold."""
    normalised = f"{float(calibration.normalise(torch.tensor(score))):.4f}" if calibration else ""
    anomalous = "" if threshold is None else int(score > threshold)
    return [path, f"{score:.6g}", normalised, anomalous, ""]


def predict(cfg: DictConfig, output_dir: Path) -> Path:
    """Scores every input image; returns the path of predictions.csv. Raises DataError if none scored."""
    device = pick_device(cfg.device)
    loaded = load_model(cfg.model, device=str(device))
    threshold = cfg.threshold if cfg.threshold is not None else getattr(loaded.calibration, "threshold", None)
    pixel_threshold = cfg.pixel_threshold if cfg.pixel_threshold is not None else getattr(
        loaded.calibration, "pixel_threshold", threshold
    )  # fmt: skip
    if threshold is None:
        log.warning("The model has no calibrated threshold (trained with dataset.val_fraction=0) and "
                    "threshold= was not given: is_anomalous and masks are left empty.")  # fmt: skip
    paths, skipped = resolve_inputs(str(cfg.input))
    if skipped:
        log.warning("%s", describe_skipped(skipped))
    samples = [Sample(path, 0, None, "new") for path in paths]
    dataset = ImageDataset(samples, loaded.preprocessing.transform(), with_masks=False, keep_errors=True)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers, collate_fn=collate)
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_path = output_dir / "predictions.csv"
    failures = written = 0
    scores = []
    with csv_path.open("w", newline="") as handle, torch.inference_mode():
        writer = csv.writer(handle)
        writer.writerow(["path", "image_score", "normalised_score", "is_anomalous", "error"])
        writer.writerows([str(file.path), "", "", "", f"not used: {file.reason}"] for file in skipped)
        for batch in tqdm(loader, desc="Predicting", unit="batch"):
            for path, error in batch["failed"]:
                log.error("Skipped %s: %s", path, error)
                writer.writerow([path, "", "", "", error])
                failures += 1
            if batch["images"] is None:
                continue
            output = loaded.model(batch["images"].to(device))
            check_finite(output, batch["paths"])
            for i, path in enumerate(batch["paths"]):
                written += 1
                score = float(output.image_score[i])
                scores.append(score)
                writer.writerow(prediction_row(path, score, loaded.calibration, threshold))
                if cfg.save_overlays:
                    stem = output_dir / "images" / f"{written:05d}_{Path(path).stem}"
                    heat = output.anomaly_map[i, 0].float().cpu()
                    save_prediction(batch["images"][i].cpu(), heat, score, threshold, pixel_threshold, stem)
    log.info("Scored %d images (%d unreadable, %d not used) → %s", written, failures, len(skipped), csv_path)
    if written == 0:
        raise DataError(f"None of the {failures} input image(s) could be read: see {csv_path}.")
    summary = {"images": written, "unreadable": failures, "not_used": len(skipped), "threshold": threshold}
    if loaded.calibration is not None:
        summary |= drift(torch.tensor(scores), loaded.calibration)
        summary["drift_detected"] = summary["drift_p_value"] < cfg.drift_alpha
        log_drift(summary, cfg.drift_alpha)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return csv_path


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


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="predict")
def main(cfg: DictConfig) -> None:
    prepare_process(cfg.reuse_freed_memory)
    report_user_errors(lambda: predict(cfg, Path(HydraConfig.get().runtime.output_dir)))


if __name__ == "__main__":
    main()
