"""Maps of test sets without ground truth, written as a benchmark's own evaluation server takes them.

A data module names its format (``submission_format``) and lists those sets (``unlabeled_sets``);
``anomaly-train`` scores them after testing and hands each batch of maps to the writer named here.

MVTec AD 2 (``mvtec_ad2_submission/`` in the run dir, as ``check_and_prepare_data_for_upload.py`` of MVTec's
public tools expects): ``anomaly_images/<object>/<set>/<stem>.tiff`` (float16 maps at each image's full
size) and ``anomaly_images_thresholded/<object>/<set>/<stem>.png`` (0/255 at the calibrated pixel
threshold).
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from anomaly.data.samples import Sample

MVTEC_AD2_SUBMISSION = "mvtec_ad2_submission"


def write_mvtec_ad2(
    category: str, set_name: str, samples: list[Sample], maps: Tensor, pixel_threshold: float | None,
    output_dir: Path,
) -> Path:  # fmt: skip
    """Writes the maps ``[B, 1, h, w]`` of ``samples`` of one private set; returns the folder to upload."""
    import tifffile  # only this writer needs it

    root = output_dir / MVTEC_AD2_SUBMISSION
    for sample, anomaly_map in zip(samples, maps, strict=True):
        with Image.open(sample.image_path) as image:
            width, height = image.size
        full = F.interpolate(anomaly_map[None].float(), size=(height, width), mode="bilinear")[0, 0]
        relative = Path(category) / set_name / sample.image_path.stem
        tiff = root / "anomaly_images" / relative.with_suffix(".tiff")
        tiff.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(tiff, full.numpy().astype(np.float16))
        if pixel_threshold is not None:
            png = root / "anomaly_images_thresholded" / relative.with_suffix(".png")
            png.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(((full > pixel_threshold).numpy() * 255).astype(np.uint8)).save(png)
    return root


SubmissionWriter = Callable[[str, str, list[Sample], Tensor, float | None, Path], Path]
WRITERS: dict[str, SubmissionWriter] = {"mvtec_ad2": write_mvtec_ad2}
