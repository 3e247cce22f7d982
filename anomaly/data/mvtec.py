"""MVTec AD, and the layout its family shares (BTAD, MVTec LOCO AD, MVTec AD 2 differ only in names).

MVTec AD: ``<root>/<category>/train/good/*.png``, ``test/<good or defect type>/*.png``,
``ground_truth/<defect type>/<stem>_mask.png``. Any folder in that layout works, with any category name
and any image format the decoder reads. :class:`Layout` says where a family member keeps what.
"""

from dataclasses import dataclass
from pathlib import Path

from anomaly.data.datamodule import CategoryDataModule, Splits
from anomaly.data.samples import (
    Sample,
    SkippedFile,
    find_mask,
    list_images,
    no_images_error,
    require_dir,
)
from anomaly.errors import DataError

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip

DOWNLOAD_HINT = (
    "Download MVTec AD from its official page (mvtec.com/company/research/datasets/mvtec-ad), "
    "extract it and pass dataset.root=<folder holding the category folders>."
)


@dataclass(frozen=True)
class Layout:
    """Where a data set of MVTec AD's family keeps its files, relative to a category folder."""

    train: str = "train/good"  # normal training images
    test: str = "test"  # a folder of folders: the good one and one per defect type
    good: str = "good"  # the test folder of normal images
    ground_truth: str = "ground_truth"  # ground_truth/<defect type>/ holds the masks
    mask_suffix: str = "_mask"  # how a missing mask is named in errors: <stem><mask_suffix>.png
    mask_folders: bool = False  # ground_truth/<defect type>/<stem>/ holds several masks: their union
    calibration: str | None = None  # normal images the data set holds out itself (its validation split)
    hint: str = DOWNLOAD_HINT  # where to get the data set


MVTEC_AD = Layout()


def layout_samples(
    root: Path, category: str, layout: Layout, skipped: list[SkippedFile] | None = None
) -> Splits:
    """Parses one category folder; unused files go to ``skipped``.

    A defective image's mask path is set even when the file is missing: the data check reports it.
    """
    category_dir = root / category
    if not category_dir.is_dir():
        found = category_folders(root, layout)
        raise DataError(f"Category '{category}' not found: expected folder {category_dir} (found: "
                        f"{', '.join(found) or 'nothing'}). {layout.hint}")  # fmt: skip
    train = _normal_samples(category_dir / layout.train, "Training images", layout, skipped)
    if not train:
        raise no_images_error(category_dir / layout.train, skipped or [], layout.hint)
    calibration = []
    if layout.calibration is not None:
        folder = category_dir / layout.calibration
        calibration = _normal_samples(folder, "Calibration images", layout, skipped)
    test_dir = require_dir(category_dir / layout.test, f"Test split of '{category}'", layout.hint)
    ground_truth = category_dir / layout.ground_truth
    test, used_masks = [], set()
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir() and p != ground_truth):
        defect = defect_dir.name
        masks = _masks(ground_truth / defect, layout, skipped)
        for path in list_images(defect_dir, skipped):
            if defect == layout.good:
                test.append(Sample(path, 0, None, "good"))
                continue
            fallback = (
                ground_truth
                / defect
                / (path.stem if layout.mask_folders else f"{path.stem}{layout.mask_suffix}.png")
            )
            mask = find_mask(masks, path) or fallback
            used_masks.add(mask)
            test.append(Sample(path, 1, mask, defect))
    if not test:
        raise DataError(f"No test images under {test_dir}/<{layout.good} or defect type>/. {layout.hint}")
    if skipped is not None and ground_truth.is_dir():
        for mask_dir in sorted(p for p in ground_truth.iterdir() if p.is_dir()):
            unused = [mask for mask in _masks(mask_dir, layout, None).values() if mask not in used_masks]
            skipped += [SkippedFile(mask, "mask without a test image") for mask in unused]
    return Splits(train, test, calibration)


def category_folders(root: Path, layout: Layout) -> list[str]:
    """The category folders under the data set's ``root`` (sorted, hidden ones left out)."""
    if not root.is_dir():
        what = "is a file, not the data set's folder" if root.exists() else "does not exist"
        raise DataError(f"Data root {root} {what}: set dataset.root to the data set's folder. {layout.hint}")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _normal_samples(
    folder: Path, what: str, layout: Layout, skipped: list[SkippedFile] | None
) -> list[Sample]:
    directory = require_dir(folder, what, layout.hint)
    return [Sample(path, 0, None, "good") for path in list_images(directory, skipped)]


def _masks(folder: Path, layout: Layout, skipped: list[SkippedFile] | None) -> dict[str, Path]:
    """The masks of one defect type by stem (``000_mask``; a folder per image with ``mask_folders``)."""
    if not folder.is_dir():
        return {}
    if layout.mask_folders:
        return {path.name: path for path in sorted(folder.iterdir()) if path.is_dir()}
    return {path.stem: path for path in list_images(folder, skipped)}


class MVTecAD(CategoryDataModule):
    """One category of MVTec AD (or of any data set laid out like it), or several for one model."""

    layout = MVTEC_AD
    known_categories = MVTEC_CATEGORIES

    def load_category(self, category: str) -> Splits:
        return layout_samples(self.root, category, self.layout, self.skipped)

    def available_categories(self) -> list[str]:
        return category_folders(self.root, self.layout)
