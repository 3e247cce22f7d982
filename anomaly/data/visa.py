"""VisA, the Visual Anomaly data set (Zou et al., "SPot-the-Difference", ECCV 2022): 12 categories.

Used as published, no conversion step: ``<root>/split_csv/1cls.csv`` names every file with columns
``object,split,label,image,mask`` (split ``train``/``test``, label ``normal``/``anomaly``, paths relative
to ``<root>``), the images are ``<category>/Data/Images/{Normal,Anomaly}/*.JPG`` and the masks
``<category>/Data/Masks/Anomaly/*.png``, whose defect pixels are non-zero class ids (not 255): the mask
reader takes any non-zero pixel as defect. Files of the category that the split does not name are listed
as skipped.
"""

import csv
from pathlib import Path

from anomaly.data.datamodule import CategoryDataModule, Splits
from anomaly.data.samples import Sample, SkippedFile
from anomaly.errors import DataError

VISA_CATEGORIES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)  # fmt: skip
SPLIT_FILE = "split_csv/1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": 0, "anomaly": 1}
HINT = (
    "Download VisA_20220922.tar from the VisA repository (github.com/amazon-science/spot-diff), extract it "
    "and pass dataset.root=<folder holding split_csv/ and the category folders>."
)


class VisA(CategoryDataModule):
    """One category of VisA, split as ``split_csv/1cls.csv`` says, or several for one model."""

    known_categories = VISA_CATEGORIES

    def available_categories(self) -> list[str]:
        return sorted({row["object"] for row in read_split(self.root / SPLIT_FILE)})

    def load_category(self, category: str) -> Splits:
        rows = read_split(self.root / SPLIT_FILE)
        categories = sorted({row["object"] for row in rows})
        if category not in categories:
            raise DataError(f"Category '{category}' is not in {self.root / SPLIT_FILE} (it lists: "
                            f"{', '.join(categories)}). {HINT}")  # fmt: skip
        train, test = [], []
        for line, row in enumerate(rows, start=2):
            if row["object"] == category:
                sample = self._sample(row, line)
                (train if row["split"] == "train" else test).append(sample)
        if not train or not test:
            missing = "train" if not train else "test"
            raise DataError(f"{self.root / SPLIT_FILE} has no '{missing}' rows for '{category}'. {HINT}")
        listed = {s.image_path for s in train + test} | {s.mask_path for s in test if s.mask_path}
        self._skip_unlisted(category, listed)
        return Splits(train, test)

    def _sample(self, row: dict[str, str], line: int) -> Sample:
        where = f"{self.root / SPLIT_FILE}, line {line}"
        if row["split"] not in ("train", "test") or row["label"] not in LABELS:
            raise DataError(f"{where}: split must be train/test and label normal/anomaly, found "
                            f"'{row['split']}', '{row['label']}'. {HINT}")  # fmt: skip
        label = LABELS[row["label"]]
        if row["split"] == "train" and label:
            raise DataError(f"{where}: an anomalous image in the training split ({row['image']}). {HINT}")
        mask = self.root / row["mask"] if label and row["mask"] else None
        if label and mask is None:
            raise DataError(f"{where}: the anomalous image {row['image']} has no mask path. {HINT}")
        return Sample(self.root / row["image"], label, mask, "anomaly" if label else "good")

    def _skip_unlisted(self, category: str, listed: set[Path]) -> None:
        """Images and masks under the category folder that the split does not name: listed, not used."""
        folder = self.root / category
        if not folder.is_dir():
            raise DataError(f"Category folder {folder} not found (named by {self.root / SPLIT_FILE}). {HINT}")
        unlisted = (p for p in sorted(folder.rglob("*")) if p.is_file() and p not in listed)
        self.skipped += [SkippedFile(path, f"not named by {SPLIT_FILE}") for path in unlisted]


def read_split(path: Path) -> list[dict[str, str]]:
    """The rows of VisA's split file (UTF-8, with or without a byte-order mark)."""
    if not path.is_file():
        raise DataError(f"VisA split file {path} not found. {HINT}")
    with path.open(newline="", encoding="utf-8-sig") as file:
        reader = csv.DictReader(file)
        if reader.fieldnames is None or not set(COLUMNS) <= set(reader.fieldnames):
            raise DataError(f"{path} must have the columns {','.join(COLUMNS)}; found "
                            f"{','.join(reader.fieldnames or []) or 'nothing'}. {HINT}")  # fmt: skip
        return [{key: (value or "").strip() for key, value in row.items()} for row in reader]
