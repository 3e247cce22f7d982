"""MVTec AD, in its official layout; any folder in that layout works (other category names too).

``<root>/<category>/train/good/*.png``, ``test/<defect or good>/*.png``,
``ground_truth/<defect>/<stem>_mask.png``.
"""

from pathlib import Path

from anomaly.data.datamodule import AnomalyDataModule
from anomaly.data.samples import Sample, list_images, require_dir
from anomaly.errors import DataError

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip

DOWNLOAD_HINT = (
    "Download MVTec AD from its official page (mvtec.com/company/research/datasets/mvtec-ad), "
    "extract it and pass dataset.root=<folder holding the category folders>."
)


def mvtec_samples(root: Path, category: str) -> tuple[list[Sample], list[Sample]]:
    """Parses one category folder into (train samples, test samples)."""
    category_dir = root / category
    train_dir = require_dir(
        category_dir / "train" / "good", f"MVTec AD category '{category}' under {root}", DOWNLOAD_HINT
    )
    train = [Sample(path, 0, None, "good") for path in list_images(train_dir)]
    if not train:
        raise DataError(f"No training images in {train_dir}. {DOWNLOAD_HINT}")
    test_dir = require_dir(category_dir / "test", f"Test split of '{category}'", DOWNLOAD_HINT)
    test = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        for path in list_images(defect_dir):
            if defect == "good":
                test.append(Sample(path, 0, None, "good"))
            else:
                test.append(Sample(path, 1, _mask_path(category_dir, defect, path), defect))
    if not test:
        raise DataError(f"No test images under {test_dir}/<defect type>/. {DOWNLOAD_HINT}")
    return train, test


def _mask_path(category_dir: Path, defect: str, image_path: Path) -> Path:
    mask = category_dir / "ground_truth" / defect / f"{image_path.stem}_mask.png"
    if not mask.is_file():
        raise DataError(
            f"Missing ground-truth mask for {image_path}: expected {mask}. "
            "Every defective test image needs one (MVTec AD layout)."
        )
    return mask


class MVTecAD(AnomalyDataModule):
    """One category of MVTec AD (or of any data set laid out like it)."""

    def __init__(self, root: str, category: str, **loader_options) -> None:
        super().__init__(**loader_options)
        self.root = Path(root).expanduser()
        self.category = category

    @property
    def name(self) -> str:
        return self.category

    def load_samples(self) -> tuple[list[Sample], list[Sample]]:
        if not self.root.is_dir():
            raise DataError(f"MVTec AD root {self.root} does not exist. {DOWNLOAD_HINT}")
        return mvtec_samples(self.root, self.category)
