"""Real-IAD (Wang et al., CVPR 2024): 30 objects, ~150 k images, every part photographed by five cameras.

Read as released, split by the release's JSON files, no conversion step::

    <root>/realiad_<256|512|1024|raw>/<object>/OK/S0001/<object>_0001_OK_C1_<time stamp>.jpg
    <root>/realiad_<...>/<object>/NG/<defect>/S0029/<object>_0029_NG_<defect>_C1_<time stamp>.jpg (+ mask)
    <root>/realiad_jsons/<split>/<object>.json  (realiad_jsons.zip extracted in <root>; or <root>/<split>/)

``<split>`` (``dataset.split``): ``realiad_jsons`` (multi-view: every view of every part),
``realiad_jsons_sv`` (single-view), ``realiad_jsons_fuiad_<0.0|0.1|0.2|0.4>`` (fully unsupervised: that
share of defective parts among the training images). A split file holds ``"meta"`` (``"prefix"``,
``"normal_class": "OK"``, ...), ``"train"`` and ``"test"``, lists of entries ``{"category": <object>,
"anomaly_class": "OK" or a defect code (AK BX CH HS PS QS YW ZW), "image_path", "mask_path" (or null)}``,
paths relative to the object's folder of the release (``dataset.resolution``). The per-object files are the
unified split too: a run over several objects reads each one's file.

Labels follow the data set's own reader: a test view is defective when its class is not ``normal_class``
and it has a mask; a view of a defective part in which the defect does not show has no mask and is good as
an image, while its part is defective (:mod:`anomaly.metrics.per_sample`). Every ``train`` entry trains, as
in the reference code (the fuiad splits put defective parts there on purpose; the log counts them). A view's
part is its file name up to ``_C<camera>_`` (``audiojack_0001_OK``): the official evaluation's sample key.

Learned from (read, not copied): Tencent/AnomalyDetection_Real-IAD, the data set's repository (README: the
folders, the split files, the evaluation command; datasets/explicit_dataset.py: the JSON keys and the
labelling rule); ADEval's README (per-sample score and label: the maximum over the views); anomalib's
RealIAD (data/datasets/image/realiad.py: ``realiad_<resolution>/<object>/<image_path>``, the JSON folders
nested in ``realiad_jsons/``); ADer (data/ad_dataset.py: ``<object>/<image_path>``, the camera as the
second-to-last ``_`` field). Not confirmed offline: what ``meta.prefix`` holds (not used: the readers above
all place the files under the object's folder), which cameras ``realiad_jsons_sv`` keeps, and whether the
raw release's five cameras share one image size (views of one part must: :func:`refuse_mixed_view_sizes`).
"""

import json
import logging
import re
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from anomaly.data.datamodule import CategoryDataModule, Splits
from anomaly.data.decode import oriented_size
from anomaly.data.samples import Sample, SkippedFile
from anomaly.errors import ConfigError, DataError

log = logging.getLogger(__name__)

REAL_IAD_OBJECTS = (
    "audiojack", "bottle_cap", "button_battery", "end_cap", "eraser", "fire_hood", "mint", "mounts", "pcb",
    "phone_battery", "plastic_nut", "plastic_plug", "porcelain_doll", "regulator", "rolled_strip_base",
    "sim_card_set", "switch", "tape", "terminalblock", "toothbrush", "toy", "toy_brick", "transistor1",
    "u_block", "usb", "usb_adaptor", "vcpill", "wooden_beads", "woodstick", "zipper",
)  # fmt: skip
RELEASES = ("256", "512", "1024", "raw")  # realiad_<release>/
ENTRY_KEYS = ("category", "anomaly_class", "image_path", "mask_path")
VIEW_NAME = re.compile(r"(?P<part>[A-Za-z][A-Za-z0-9_]*_\d{4}_[A-Z][A-Z_]*[A-Z])_C(?P<view>\d)_")
HINT = (
    "Real-IAD is given on request (realiad4ad.github.io/Real-IAD): extract realiad_jsons.zip and the object "
    "archives of one release (realiad_256, realiad_512, realiad_1024 or realiad_raw) into dataset.root."
)
SHOWN = 10  # files listed per error block


class RealIAD(CategoryDataModule):
    """One Real-IAD object, split as its JSON file of ``split`` says, images of release ``resolution``."""

    def __init__(
        self, root: str, category: str, resolution: int | str = 1024, split: str = "realiad_jsons",
        **loader_options,
    ) -> None:  # fmt: skip
        super().__init__(root, category, **loader_options)
        self.resolution = str(resolution)
        if self.resolution not in RELEASES:
            raise ConfigError(f"dataset.resolution must be one of {', '.join(RELEASES)} (the realiad_<...> "
                              f"folders of the release), got {resolution!r}")  # fmt: skip
        self.split = split

    known_categories = REAL_IAD_OBJECTS  # category=all: one model for the 30 objects

    def load_category(self, category: str) -> Splits:
        return real_iad_splits(self.root, category, self.resolution, self.split, self.skipped)

    def available_categories(self) -> list[str]:
        return sorted(path.stem for path in split_folder(self.root, self.split).glob("*.json"))


def real_iad_splits(
    root: Path, category: str, resolution: str, split: str, skipped: list[SkippedFile] | None = None
) -> Splits:
    """The train and test samples of object ``category``; files of its folder that the split file does not
    name go to ``skipped``. Raises a DataError naming the file and the fix for every layout problem."""
    split_path = split_file(root, split, category)
    normal_class, entries = read_split_file(split_path)
    folder = release_folder(root, resolution, category)
    samples = {
        name: [
            entry_sample(entry, f"{split_path}, {name}[{i}]", folder, category, normal_class, name == "train")
            for i, entry in enumerate(listed)
        ]
        for name, listed in entries.items()
    }
    if not samples["train"] or not samples["test"]:
        empty = "train" if not samples["train"] else "test"
        raise DataError(f"{split_path} lists no '{empty}' entries for '{category}'. {HINT}")
    refuse_missing_files(split_path, samples)
    refuse_mixed_view_sizes([*samples["train"], *samples["test"]], folder)
    if skipped is not None:
        listed = {path for s in (*samples["train"], *samples["test"]) for path in (s.image_path, s.mask_path)}
        unlisted = [path for path in sorted(folder.rglob("*")) if path.is_file() and path not in listed]
        skipped += [
            SkippedFile(p, f"not named by {split_path.parent.name}/{split_path.name}") for p in unlisted
        ]
    log.info(describe(category, split, samples))
    return Splits(samples["train"], samples["test"])


def split_file(root: Path, split: str, category: str) -> Path:
    """``<root>/realiad_jsons/<split>/<category>.json`` (or ``<root>/<split>/...``): the split file."""
    folder = split_folder(root, split)
    path = folder / f"{category}.json"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.json"))
        raise DataError(
            f"Unknown Real-IAD object '{category}': {path} does not exist ({folder} holds the split files "
            f"of: {', '.join(known) or 'nothing'}). Set dataset.category to one of them "
            f"(experiment=benchmark_real_iad runs all {len(REAL_IAD_OBJECTS)})."
        )
    return path


def split_folder(root: Path, split: str) -> Path:
    """``<root>/realiad_jsons/<split>`` (or ``<root>/<split>``): the folder of one split's files."""
    if not root.is_dir():
        what = "is a file, not the data set's folder" if root.exists() else "does not exist"
        raise DataError(f"Data root {root} {what}: set dataset.root to the folder holding Real-IAD. {HINT}")
    tried = [root / "realiad_jsons" / split, root / split]
    folder = next((path for path in tried if path.is_dir()), None)
    if folder is None:
        candidates = [*root.glob("realiad_jsons*"), *root.glob("realiad_jsons/realiad_jsons*")]
        found = sorted({p.name for p in candidates if p.is_dir() and any(p.glob("*.json"))})
        raise DataError(
            f"Real-IAD split folder '{split}' not found: looked for {tried[0]} and {tried[1]} (split folders "
            f"found: {', '.join(found) or 'none'}). Set dataset.split to one of them, or extract "
            f"realiad_jsons.zip into {root}. {HINT}"
        )
    return folder


def read_split_file(path: Path) -> tuple[str, dict[str, list]]:
    """``(normal_class, {"train": entries, "test": entries})`` of a split file, its structure checked."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path} is not valid JSON ({error}): restore it from realiad_jsons.zip.") from None
    if not isinstance(data, dict) or not {"meta", "train", "test"} <= set(data):
        found = ", ".join(data) if isinstance(data, dict) else type(data).__name__
        raise DataError(f"{path} must hold an object with the keys meta, train and test (a Real-IAD split "
                        f"file); found {found or 'nothing'}. Restore it from realiad_jsons.zip.")  # fmt: skip
    normal_class = data["meta"].get("normal_class") if isinstance(data["meta"], dict) else None
    if not isinstance(normal_class, str):
        raise DataError(f"{path}: meta.normal_class must name the good class (\"OK\" in the release), found "
                        f"{normal_class!r}. Restore it from realiad_jsons.zip.")  # fmt: skip
    for name in ("train", "test"):
        if not isinstance(data[name], list):
            raise DataError(f"{path}: '{name}' must be a list of entries, found {type(data[name]).__name__}.")
    return normal_class, {"train": data["train"], "test": data["test"]}


def release_folder(root: Path, resolution: str, category: str) -> Path:
    """``<root>/realiad_<resolution>/<category>``, the folder the split file's paths are relative to."""
    folder = root / f"realiad_{resolution}" / category
    if not folder.is_dir():
        releases = sorted(p.name for p in root.glob("realiad_*") if p.is_dir() and p.name[8:] in RELEASES)
        raise DataError(
            f"Real-IAD images of '{category}' not found: expected folder {folder} (releases found in {root}: "
            f"{', '.join(releases) or 'none'}). Set dataset.resolution to a release you have, or extract "
            f"{category}'s archive of realiad_{resolution} there. {HINT}"
        )
    return folder


def entry_sample(
    entry: object, where: str, folder: Path, category: str, normal_class: str, training: bool
) -> Sample:
    """The :class:`Sample` of one split-file entry (``where``: the file and the entry, for errors)."""
    if not isinstance(entry, dict) or not set(ENTRY_KEYS) <= set(entry):
        raise DataError(f"{where}: an entry must hold {', '.join(ENTRY_KEYS)}, found {str(entry)[:200]}. "
                        "Restore the file from realiad_jsons.zip.")  # fmt: skip
    kind, image, mask = entry["anomaly_class"], entry["image_path"], entry["mask_path"]
    if not (isinstance(kind, str) and isinstance(image, str) and image and isinstance(mask, str | None)):
        raise DataError(f"{where}: anomaly_class and image_path must be text and mask_path text or null, "
                        f"found {entry}. Restore the file from realiad_jsons.zip.")  # fmt: skip
    if entry["category"] != category:
        raise DataError(f"{where}: an entry of object '{entry['category']}' in the split file of "
                        f"'{category}'. Restore the file from realiad_jsons.zip.")  # fmt: skip
    view = VIEW_NAME.match(Path(image).name)
    if view is None:
        raise DataError(
            f"{where}: cannot tell the part and the camera from the file name '{Path(image).name}': Real-IAD "
            "names a view <object>_<4 digits>_<OK or NG_<defect>>_C<camera>_<time stamp>.jpg. Restore the "
            "file from realiad_jsons.zip."
        )
    defective = not training and kind != normal_class and mask is not None
    defect_type = kind if defective or training else f"{kind} (not in this view)"
    return Sample(
        image_path=folder / image,
        label=int(defective),
        mask_path=folder / mask if defective else None,
        defect_type="good" if kind == normal_class else defect_type,
        sample_id=view["part"],
        view=int(view["view"]),
    )


def refuse_missing_files(split_path: Path, samples: dict[str, list[Sample]]) -> None:
    """One DataError naming every entry of ``split_path`` whose image (or, in test, mask) is missing."""
    missing = [
        f"{name}[{i}] {key}: {path}"
        for name, listed in samples.items()
        for i, sample in enumerate(listed)
        for key, path in (("image_path", sample.image_path), ("mask_path", sample.mask_path))
        if path is not None and not path.is_file()
    ]
    if missing:
        raise DataError(
            f"{split_path} names {len(missing)} file(s) that do not exist:{listed(missing)}"
            "\nThe split file and the images must come from one Real-IAD download: extract the object's "
            "archive of this release (dataset.resolution) again, or set dataset.resolution to the release "
            "whose files you have."
        )


def refuse_mixed_view_sizes(samples: list[Sample], folder: Path) -> None:
    """One DataError naming every part whose views have different image sizes (files of two releases mixed:
    each release holds every view of a part at one size). Unreadable files are left to the data check."""
    with ThreadPoolExecutor(8) as pool:
        sizes = dict(zip(samples, pool.map(_size_or_none, (s.image_path for s in samples)), strict=True))
    parts: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        parts[sample.sample_id].append(sample)
    mixed = [
        f"{part}: " + ", ".join(f"C{s.view} {s.image_path.name} {_wxh(sizes[s])}" for s in views)
        for part, views in parts.items()
        if len({sizes[s] for s in views if sizes[s] is not None}) > 1
    ]
    if mixed:
        raise DataError(
            f"{len(mixed)} Real-IAD part(s) in {folder} have views of different sizes (width x height):"
            f"{listed(mixed)}\nA release holds every view of a part at one size (realiad_256, _512 and "
            "_1024 are square at theirs): files of two releases were mixed here. Extract the object's "
            "archive of one release again."
        )


def listed(lines: list[str]) -> str:
    """The first :data:`SHOWN` of ``lines``, each on an indented line of its own, and how many more."""
    more = f"\n  ... and {len(lines) - SHOWN} more" if len(lines) > SHOWN else ""
    return "\n  " + "\n  ".join(lines[:SHOWN]) + more


def _wxh(size: tuple[int, int] | None) -> str:
    return "unreadable" if size is None else f"{size[0]}x{size[1]}"


def _size_or_none(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` from the header as the run reads it; None when missing or unreadable."""
    try:
        with Image.open(path) as image:
            return oriented_size(image)
    except Exception:  # PIL raises many types for damaged files: the data check names them all
        return None


def describe(category: str, split: str, samples: dict[str, list[Sample]]) -> str:
    """One log line: images and parts per split, views per part, defective training images (fuiad)."""
    train, test = samples["train"], samples["test"]
    views = Counter(Counter(s.sample_id for s in test).values())
    parts = {s.sample_id: 0 for s in test}
    for sample in test:
        parts[sample.sample_id] |= sample.label
    noisy = sum(s.defect_type != "good" for s in train)
    return (
        f"Real-IAD {category} ({split}): train {len(train)} images of {len({s.sample_id for s in train})} "
        f"parts{f' ({noisy} of them defective, trained on as the split says)' if noisy else ''}; test "
        f"{len(test)} images of {len(parts)} parts ({sum(parts.values())} defective), "
        + ", ".join(f"{number} with {count} view(s)" for count, number in sorted(views.items()))
    )
