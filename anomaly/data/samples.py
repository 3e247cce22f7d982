"""A data set is a table of samples; listing a folder records every file it does not use, and why."""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor

from anomaly.data.decode import IMAGE_EXTENSIONS
from anomaly.errors import DataError

MASK_SUFFIXES = ("_mask", "-mask", "")  # <stem>_mask.png, <stem>-mask.png or <stem>.png, in this order
T = TypeVar("T")


@dataclass(frozen=True)
class Sample:
    """One image of a data set. Several images can show one physical part (Real-IAD's five camera views):
    they share a ``sample_id``, and the per-sample metrics take them together."""

    image_path: Path
    label: int  # 0 = good, 1 = defective
    mask_path: Path | None  # None: no pixel ground truth (good images, or a folder without masks)
    defect_type: str  # "good" or the defect folder name
    sample_id: str | None = None  # the physical part it shows; None: the image is a part of its own
    view: int | None = None  # which camera of that part (Real-IAD: 1-5); None: a single view
    category: str = ""  # the category it was listed for (a unified run tests each apart); "" without one


@dataclass(frozen=True)
class SkippedFile:
    """A file a data source saw and did not use; listed in the run's log, never dropped in silence."""

    path: Path
    reason: str


def list_images(
    folder: Path, skipped: list[SkippedFile] | None = None, sub_folders: str = "folder"
) -> list[Path]:
    """Image files of ``folder``, sorted (deterministic). Everything else is appended to ``skipped``:
    hidden files, other extensions, sub-folders (with the reason ``sub_folders``). A broken link with an
    image name is listed, so that the data check reports it instead of it vanishing from the counts."""
    images = []
    for path in _entries(folder):
        reason = sub_folders if path.is_dir() and not path.name.startswith(".") else _not_an_image(path)
        if reason is None:
            images.append(path)
        elif skipped is not None:
            skipped.append(SkippedFile(path, reason))
    return images


def list_images_recursive(
    folder: Path, excluded_folders: tuple[str, ...] = (), skipped: list[SkippedFile] | None = None
) -> list[Path]:
    """Image files anywhere under ``folder`` (sorted), except hidden ones and those below a sub-folder
    named in ``excluded_folders`` (a folder of generic images: penalty images, distillation, samples).
    What is not used goes to ``skipped``, by the same rules as :func:`list_images`."""
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise DataError(f"Image folder {folder} {what}: pass a folder of images.")
    images = []
    for path in _entries(folder):
        if path.is_dir() and not path.name.startswith(".") and path.name not in excluded_folders:
            images += list_images_recursive(path, excluded_folders, skipped)
            continue
        reason = _not_an_image(path)
        if path.is_dir():
            reason = "excluded folder" if path.name in excluded_folders else "hidden folder"
        if reason is None:
            images.append(path)
        elif skipped is not None:
            skipped.append(SkippedFile(path, reason))
    return images


def describe_skipped(skipped: list[SkippedFile], shown: int = 5) -> str:
    """``N file(s) not used: <path> (<reason>), ... and M more``: the one wording every command uses."""
    listed = ", ".join(f"{f.path} ({f.reason})" for f in skipped[:shown])
    more = f" and {len(skipped) - shown} more" if len(skipped) > shown else ""
    return f"{len(skipped)} file(s) not used: {listed}{more}"


def _entries(folder: Path) -> list[Path]:
    """The folder's entries, sorted; a folder that cannot be listed is a DataError naming it."""
    try:
        return sorted(folder.iterdir())
    except PermissionError:
        raise DataError(
            f"Cannot list folder {folder}: permission denied. Give this user read and execute permission "
            f"on it (chmod u+rx '{folder}') or run as a user who has it."
        ) from None
    except NotADirectoryError:
        raise DataError(f"{folder} is a file, not a folder: pass the folder that holds the images.") from None
    except OSError as error:
        raise DataError(f"Cannot list folder {folder}: {error.strerror or error}.") from None


def _not_an_image(path: Path) -> str | None:
    if path.name.startswith("."):
        return "hidden file"
    if path.is_dir():
        return "folder"
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image extension ({path.suffix or 'none'}; read: {' '.join(IMAGE_EXTENSIONS)})"
    return None


def find_mask(masks: dict[str, Path], image_path: Path) -> Path | None:
    """The mask of ``image_path`` among ``masks`` (file name stem -> path), by :data:`MASK_SUFFIXES`."""
    for suffix in MASK_SUFFIXES:
        if (mask := masks.get(image_path.stem + suffix)) is not None:
            return mask
    return None


def require_dir(path: Path, what: str, fix: str) -> Path:
    """Returns ``path`` if it is a folder, else raises a DataError naming it and the fix."""
    if path.is_file():
        raise DataError(f"{what}: {path} is a file, but a folder is expected there. {fix}")
    if not path.is_dir():
        raise DataError(f"{what} not found: expected folder {path}. {fix}")
    return path


def no_images_error(folder: Path, skipped: list[SkippedFile], fix: str) -> DataError:
    """ "No images in ``folder``", with what was there and not used (unsupported formats, sub-folders)."""
    here = [f for f in skipped if f.path.parent == folder]
    found = f" It holds {describe_skipped(here)}." if here else " It is empty."
    return DataError(f"No images in {folder}.{found} {fix}")


def seeded_order(count: int, seed: int) -> list[int]:
    """A permutation of ``range(count)`` from ``seed``: every seeded split and fold of the data sets."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()


def seeded_split(items: Sequence[T], count: int, seed: int) -> tuple[list[T], list[T]]:
    """``(kept, held_out)``: ``count`` of ``items`` drawn by :func:`seeded_order`; both keep their order."""
    held = set(seeded_order(len(items), seed)[:count])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def part_numbers(samples: Sequence[Sample]) -> Tensor | None:
    """``[N]`` int64: the physical part each sample shows, numbered in order of first appearance (images
    without a ``sample_id`` each a part of their own); None when no sample names a part."""
    if all(sample.sample_id is None for sample in samples):
        return None
    numbers: dict[object, int] = {}
    keys = (
        sample.sample_id if sample.sample_id is not None else ("image", i) for i, sample in enumerate(samples)
    )
    return torch.tensor([numbers.setdefault(key, len(numbers)) for key in keys], dtype=torch.int64)
