"""Teaching a fitted model newly approved good parts, without refitting it.

PaDiM adds the images to its statistics (the same model as a refit on all images, up to float rounding);
PatchCore extends its coreset greedily over the new patches, keeping its bank. The thresholds are fitted
again on the old calibration scores plus the new images' scores under the old model, which had not seen
them: normal scores the model did not fit on, as calibration needs (for the updated model, which knows
more good parts, they are if anything high: the thresholds err towards fewer false alarms). The result
is a new model file next to the old one, never over it, with the lineage recorded in it.

The new images pass the frozen backbone twice, scored under the old model and then learnt; with a feature
cache (the run's resources) the second pass reads what the first computed, bit for bit the same features.
"""

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from anomaly.calibration import Calibration, fit_calibration
from anomaly.data.check import check_samples, problem_report
from anomaly.data.dataset import ImageDataset
from anomaly.data.samples import (
    Sample,
    SkippedFile,
    describe_skipped,
    list_images_recursive,
    no_images_error,
)
from anomaly.errors import ConfigError, DataError
from anomaly.methods.base import FitOnceModel, RunResources, images_on, score_batches
from anomaly.model_io import find_model_file, load_model, save_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpdateResult:
    parent: Path  # the model file that was updated (unchanged)
    output: Path  # the new model file
    added_images: int
    skipped: list[SkippedFile]  # files of the input that were not images, with the reason
    calibration: Calibration | None  # refitted with the added images; None when the model had none


def update_model(
    model: str | Path,
    images: str | Path,
    output: str | Path | None = None,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    resources: RunResources,
    backbone_weights_path: str | None = None,
) -> UpdateResult:
    """Adds the good images under ``images`` (searched recursively) to the fitted PaDiM or PatchCore
    ``model`` (a run dir or its model file) and writes the result to ``output`` (default:
    ``<model>.updated-<time>.safetensors`` beside it), never over an existing file. ``resources``: this
    machine's spill folder and feature cache (``RunResources()``: none).
    ``backbone_weights_path``: this machine's file of the pretrained backbone's weights (see
    :func:`~anomaly.model_io.load_model`)."""
    model_file = find_model_file(model)
    loaded = load_model(model_file, device, backbone_weights_path)
    if not isinstance(loaded.model, FitOnceModel):
        raise ConfigError(
            f"{loaded.method} is trained by gradient steps: it learns new good parts by training again"
        )
    loaded.model.use_resources(resources)
    output = Path(output) if output else model_file.with_name(
        f"{model_file.stem}.updated-{time.strftime('%Y%m%d-%H%M%S')}.safetensors"
    )  # fmt: skip
    if output.exists() or output.resolve() == model_file.resolve():
        raise ConfigError(
            f"{output} exists: anomaly-update never overwrites a model file; pass output=<new file>"
        )

    images = Path(images)
    skipped: list[SkippedFile] = []
    paths = list_images_recursive(images, skipped=skipped)
    if not paths:
        raise no_images_error(images, skipped, "Give a folder of newly approved good parts (input=).")
    if skipped:
        log.warning("%s", describe_skipped(skipped))
    samples = [Sample(path, 0, None, "good") for path in paths]
    if problems := check_samples(samples, description="Checking the new images"):
        raise DataError(problem_report(problems, str(images), len(samples)) + "\nFix or remove these files.")
    dataset = ImageDataset(samples, loaded.preprocessing.transform(), with_masks=False)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)

    scores, maxima = [], []  # before the update: held-out scores
    for _, scored in score_batches(loaded.model, loader, device):
        scores.append(scored.image_score.cpu())
        maxima.append(scored.anomaly_map.amax(dim=(1, 2, 3)).cpu())
    with torch.no_grad():
        loaded.model.update(images_on(loader, device))

    calibration = loaded.calibration
    if calibration is not None:
        old_scores = torch.tensor(calibration.scores, dtype=torch.float64)
        old_maxima = torch.tensor(calibration.map_maxima, dtype=torch.float64)
        new_scores, new_maxima = torch.cat(scores).double(), torch.cat(maxima).double()
        calibration = fit_calibration(
            torch.cat([old_scores, new_scores]), torch.cat([old_maxima, new_maxima]),
            calibration.false_alarm_rate, calibration.pixel_false_alarm_rate, calibration.confidence,
            f"{calibration.source}, and {len(samples)} added images scored before the update",
        )  # fmt: skip
    lineage = {
        "parent": str(model_file.resolve()),
        "parent_sha256": hashlib.sha256(model_file.read_bytes()).hexdigest(),
        "added_images": len(samples),
        "not_used": [f"{file.path} ({file.reason})" for file in skipped],
        "input": str(images.resolve()),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    save_model(loaded.model, loaded.method, loaded.config, loaded.preprocessing, output, calibration,
               lineage=[*loaded.lineage, lineage], tiling=loaded.tiling)  # fmt: skip
    return UpdateResult(model_file, output, len(samples), skipped, calibration)
