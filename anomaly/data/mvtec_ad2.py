"""MVTec AD 2 (Heckler-Kram et al., 2025): eight objects, larger images, harder lighting.

``<root>/<object>/train/good/*.png``, ``validation/good/*.png`` (normal images held out by the data set:
they calibrate, never train), ``test_public/{good,bad}/*.png`` with ``test_public/ground_truth/bad/
<stem>_mask.png``, and ``test_private/``, ``test_private_mixed/`` without ground truth. The test metrics
come from test_public; the private sets are scored after testing and written as the official evaluation
server takes them (``mvtec_ad2_submission/`` in the run dir, as ``check_and_prepare_data_for_upload.py``
of MVTec's public tools expects): ``anomaly_images/<object>/<set>/<stem>.tiff`` (float16 maps at each
image's full size) and ``anomaly_images_thresholded/<object>/<set>/<stem>.png`` (0/255 at the calibrated
pixel threshold).
"""

from pathlib import Path

import numpy as np
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from anomaly.data.mvtec import Layout, MVTecAD
from anomaly.data.samples import Sample, list_images
from anomaly.errors import ConfigError

AD2_CATEGORIES = ("can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial", "wallplugs", "walnuts")
AD2_LAYOUT = Layout(
    test="test_public",
    ground_truth="test_public/ground_truth",
    good="good",
    calibration="validation/good",
    hint="Download MVTec AD 2 from mvtec.com/company/research/datasets/mvtec-ad-2, extract it and pass "
    "dataset.root=<folder holding the object folders>.",
)
PRIVATE_SETS = ("test_private", "test_private_mixed")
SUBMISSION = "mvtec_ad2_submission"


class MVTecAD2(MVTecAD):
    """One object of MVTec AD 2; its private test sets are written for the evaluation server."""

    layout = AD2_LAYOUT

    def __init__(self, root: str, category: str, **loader_options) -> None:
        super().__init__(root, category, **loader_options)
        if self.preprocessing.crop_size is not None:
            raise ConfigError(
                "MVTec AD 2's evaluation takes maps of whole images: use dataset.crop_size=null"
            )

    def unlabeled_sets(self) -> dict[str, list[Sample]]:
        sets = {}
        for name in PRIVATE_SETS:
            folder = self.root / self.category / name
            if folder.is_dir():
                sets[name] = [Sample(path, 0, None, name) for path in list_images(folder, self.skipped)]
        return sets

    def write_unlabeled(self, name: str, samples: list[Sample], maps: Tensor, pixel_threshold: float | None,
                        output_dir: Path) -> Path:  # fmt: skip
        import tifffile  # only this writer needs it

        root = output_dir / SUBMISSION
        for sample, anomaly_map in zip(samples, maps, strict=True):
            with Image.open(sample.image_path) as image:
                width, height = image.size
            full = F.interpolate(anomaly_map[None].float(), size=(height, width), mode="bilinear")[0, 0]
            relative = Path(self.category) / name / sample.image_path.stem
            tiff = root / "anomaly_images" / relative.with_suffix(".tiff")
            tiff.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(tiff, full.numpy().astype(np.float16))
            if pixel_threshold is not None:
                png = root / "anomaly_images_thresholded" / relative.with_suffix(".png")
                png.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(((full > pixel_threshold).numpy() * 255).astype(np.uint8)).save(png)
        return root
