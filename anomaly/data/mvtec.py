"""MVTec AD, in its official layout; any folder in that layout works (other category names too).

``<root>/<category>/train/good/*.png``, ``test/<defect or good>/*.png``,
``ground_truth/<defect>/<stem>_mask.png``.
"""

from pathlib import Path

from anomaly.data.datamodule import AnomalyDataModule
from anomaly.data.samples import Sample, SkippedFile, find_mask, list_images, require_dir
from anomaly.errors import DataError

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip

DOWNLOAD_HINT = (
    "Download MVTec AD from its official page (mvtec.com/company/research/datasets/mvtec-ad), "
    "extract it and pass dataset.root=<folder holding the category folders>."
)


def mvtec_samples(
    root: Path, category: str, skipped: list[SkippedFile] | None = None
) -> tuple[list[Sample], list[Sample]]:
    """Parses one category folder into (train samples, test samples); unused files go to ``skipped``.

    A defective image's mask path is set even when the file is missing: the data check reports it.
    """
    category_dir = root / category
    train_dir = require_dir(
        category_dir / "train" / "good", f"MVTec AD category '{category}' under {root}", DOWNLOAD_HINT
    )
    train = [Sample(path, 0, None, "good") for path in list_images(train_dir, skipped)]
    if not train:
        raise DataError(f"No training images in {train_dir}. {DOWNLOAD_HINT}")
    test_dir = require_dir(category_dir / "test", f"Test split of '{category}'", DOWNLOAD_HINT)
    test, used_masks = [], set()
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        defect = defect_dir.name
        masks = _masks(category_dir / "ground_truth" / defect, skipped)
        for path in list_images(defect_dir, skipped):
            if defect == "good":
                test.append(Sample(path, 0, None, "good"))
                continue
            mask = find_mask(masks, path) or category_dir / "ground_truth" / defect / f"{path.stem}_mask.png"
            used_masks.add(mask)
            test.append(Sample(path, 1, mask, defect))
    if not test:
        raise DataError(f"No test images under {test_dir}/<defect type>/. {DOWNLOAD_HINT}")
    ground_truth = category_dir / "ground_truth"
    if skipped is not None and ground_truth.is_dir():
        for mask_dir in sorted(p for p in ground_truth.iterdir() if p.is_dir()):
            skipped += [
                SkippedFile(mask, "mask without a test image")
                for mask in list_images(mask_dir)
                if mask not in used_masks
            ]
    return train, test


def _masks(folder: Path, skipped: list[SkippedFile] | None) -> dict[str, Path]:
    """The masks of one defect type by file stem (``000_mask``), empty without the folder."""
    if not folder.is_dir():
        return {}
    return {path.stem: path for path in list_images(folder, skipped)}


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
        return mvtec_samples(self.root, self.category, self.skipped)
