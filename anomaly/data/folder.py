"""The user's own images: a folder of good parts, optionally defective parts and their masks.

``<root>/<normal_dir>``: good images (training, and a held-out share for testing unless
``normal_test_dir`` is given); ``<root>/<abnormal_dir>``: defective images (test only);
``<root>/<mask_dir>``: masks matched to defective images by file stem (``<stem>_mask.png``,
``<stem>-mask.png`` or ``<stem>.png``). Without defective images there is no image AUROC; without
any mask there are no pixel metrics (both are skipped with a note, never faked); with some masks,
every defective image needs one (the data check names those without).
"""

from pathlib import Path

from anomaly.data.datamodule import AnomalyDataModule, Splits
from anomaly.data.samples import (
    Sample,
    SkippedFile,
    find_mask,
    list_images,
    no_images_error,
    require_dir,
    seeded_split,
)

LAYOUT_HINT = "Expected <root>/good with normal images (see README, 'Your data')."


class Folder(AnomalyDataModule):
    def __init__(
        self,
        root: str,
        normal_dir: str = "good",
        abnormal_dir: str | None = "defect",
        mask_dir: str | None = "mask",
        normal_test_dir: str | None = None,
        normal_test_fraction: float = 0.2,
        **loader_options,
    ) -> None:
        super().__init__(**loader_options)
        self.root = Path(root).expanduser()
        self.normal_dir = normal_dir
        self.abnormal_dir = abnormal_dir
        self.mask_dir = mask_dir
        self.normal_test_dir = normal_test_dir
        self.normal_test_fraction = normal_test_fraction

    @property
    def name(self) -> str:
        return self.root.name

    def load_samples(self) -> Splits:
        require_dir(self.root, "dataset.root", LAYOUT_HINT)
        normal_dir = require_dir(self.root / self.normal_dir, "Folder of normal images", LAYOUT_HINT)
        normal = list_images(normal_dir, self.skipped)
        if self.normal_test_dir is None:
            train_paths, test_good = self._hold_out(normal)
        else:
            train_paths = normal
            test_dir = require_dir(self.root / self.normal_test_dir, "Normal test folder", LAYOUT_HINT)
            test_good = list_images(test_dir, self.skipped)
        if not train_paths:
            raise no_images_error(normal_dir, self.skipped, LAYOUT_HINT)
        train = [Sample(p, 0, None, "good") for p in train_paths]
        test = [Sample(p, 0, None, "good") for p in test_good] + self._defective()
        return Splits(train, test)

    def _hold_out(self, normal: list[Path]) -> tuple[list[Path], list[Path]]:
        """Seeded split of the normal images into training and test."""
        return seeded_split(normal, round(len(normal) * self.normal_test_fraction), self.seed)

    def _defective(self) -> list[Sample]:
        """Defective samples; with any mask present, each gets its mask or the path it should have."""
        if self.abnormal_dir is None or not (self.root / self.abnormal_dir).is_dir():
            return []
        mask_dir = self.root / self.mask_dir if self.mask_dir else None
        masks = {}
        if mask_dir is not None and mask_dir.is_dir():
            masks = {path.stem: path for path in list_images(mask_dir, self.skipped)}
        samples = []
        for path in list_images(self.root / self.abnormal_dir, self.skipped):
            mask = find_mask(masks, path) or (mask_dir / f"{path.stem}_mask.png" if masks else None)
            samples.append(Sample(path, 1, mask, "defect"))
        used = {sample.mask_path for sample in samples}
        self.skipped += [
            SkippedFile(p, "mask without a defective image") for p in masks.values() if p not in used
        ]
        return samples
