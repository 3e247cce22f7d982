"""``anomaly-update``: teach a fitted model newly approved good parts, without refitting it.

PaDiM adds the images to its statistics (the same model as a refit on all images, up to float rounding);
PatchCore extends its coreset greedily over the new patches, keeping its bank. The thresholds are fitted
again on the old calibration scores plus the new images' scores under the old model, which had not seen
them: normal scores the model did not fit on, as calibration needs (for the updated model, which knows
more good parts, they are if anything high: the thresholds err towards fewer false alarms). The result
is a new model file next to the old one, never over it, with the lineage recorded in it.
"""

import hashlib
import logging
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from anomaly.calibration import fit_calibration
from anomaly.cli.export import find_model_file
from anomaly.cli.predict import pick_device
from anomaly.cli.runtime import CONFIG_PATH, prepare_process, report_user_errors
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
from anomaly.methods.base import FitOnceModel, check_finite
from anomaly.model_io import load_model, save_model

log = logging.getLogger(__name__)


def update(cfg: DictConfig) -> Path:
    """Writes and returns the updated model file."""
    model_file = find_model_file(cfg.model)
    device = pick_device(cfg.device)
    loaded = load_model(model_file, device=str(device))
    if not isinstance(loaded.model, FitOnceModel):
        raise ConfigError(
            f"{loaded.method} is trained by gradient steps: it learns new good parts by training again"
        )
    output = Path(cfg.output) if cfg.output else model_file.with_name(
        f"{model_file.stem}.updated-{time.strftime('%Y%m%d-%H%M%S')}.safetensors"
    )  # fmt: skip
    if output.exists() or output.resolve() == model_file.resolve():
        raise ConfigError(
            f"{output} exists: anomaly-update never overwrites a model file; pass output=<new file>"
        )

    skipped: list[SkippedFile] = []
    paths = list_images_recursive(Path(cfg.input), skipped=skipped)
    if not paths:
        fix = "Give a folder of newly approved good parts (input=)."
        raise no_images_error(Path(cfg.input), skipped, fix)
    if skipped:
        log.warning("%s", describe_skipped(skipped))
    samples = [Sample(path, 0, None, "good") for path in paths]
    if problems := check_samples(samples, description="Checking the new images"):
        raise DataError(
            problem_report(problems, str(cfg.input), len(samples)) + "\nFix or remove these files."
        )
    dataset = ImageDataset(samples, loaded.preprocessing.transform(), with_masks=False)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers)

    def batches():
        return (batch["image"].to(device) for batch in loader)

    with torch.no_grad():
        outputs = []
        for batch in loader:  # before the update: held-out scores
            outputs.append(loaded.model(batch["image"].to(device)))
            check_finite(outputs[-1], batch["path"])
        scores = torch.cat([output.image_score for output in outputs]).cpu()
        maxima = torch.cat([output.anomaly_map.amax(dim=(1, 2, 3)) for output in outputs]).cpu()
        del outputs
        loaded.model.update(batches())

    calibration = loaded.calibration
    if calibration is not None:
        old_scores = torch.tensor(calibration.scores, dtype=torch.float64)
        old_maxima = torch.tensor(calibration.map_maxima, dtype=torch.float64)
        calibration = fit_calibration(
            torch.cat([old_scores, scores.double()]), torch.cat([old_maxima, maxima.double()]),
            calibration.false_alarm_rate, calibration.pixel_false_alarm_rate, calibration.confidence,
            f"{calibration.source}, and {len(samples)} added images scored before the update",
        )  # fmt: skip
    lineage = {
        "parent": str(model_file.resolve()),
        "parent_sha256": hashlib.sha256(model_file.read_bytes()).hexdigest(),
        "added_images": len(samples),
        "not_used": [f"{file.path} ({file.reason})" for file in skipped],
        "input": str(Path(cfg.input).resolve()),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    save_model(loaded.model, loaded.method, loaded.config, loaded.preprocessing, output, calibration,
               lineage=[*loaded.lineage, lineage], tiling=loaded.tiling)  # fmt: skip
    not_used = f"\n  {describe_skipped(skipped)}" if skipped else ""
    print(f"\nAdded {len(samples)} good images to {model_file}{not_used}\n  wrote {output}", flush=True)
    if calibration is not None:
        rate, confidence = 100 * calibration.guaranteed_rate, 100 * calibration.confidence
        print(f"  threshold {calibration.threshold:.6g} from {calibration.num_images} normal images: at most "
              f"{rate:.1f} % false alarms at {confidence:.0f} % confidence", flush=True)  # fmt: skip
    return output


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="update")
def main(cfg: DictConfig) -> None:
    prepare_process(cfg.reuse_freed_memory)
    report_user_errors(lambda: update(cfg))


if __name__ == "__main__":
    main()
