"""A data set is a table of samples; listing a folder records every file it does not use, and why."""

from dataclasses import dataclass
from pathlib import Path

from anomaly.data.decode import IMAGE_EXTENSIONS
from anomaly.errors import DataError

MASK_SUFFIXES = ("_mask", "-mask", "")  # <stem>_mask.png, <stem>-mask.png or <stem>.png, in this order


@dataclass(frozen=True)
class Sample:
    image_path: Path
    label: int  # 0 = good, 1 = defective
    mask_path: Path | None  # None: no pixel ground truth (good images, or a folder without masks)
    defect_type: str  # "good" or the defect folder name


@dataclass(frozen=True)
class SkippedFile:
    """A file a data source saw and did not use; listed in the run's log, never dropped in silence."""

    path: Path
    reason: str


def list_images(folder: Path, skipped: list[SkippedFile] | None = None) -> list[Path]:
    """Image files of ``folder``, sorted (deterministic). Everything else is appended to ``skipped``:
    hidden files, other extensions, sub-folders. A broken link with an image name is listed, so that
    the data check reports it instead of it vanishing from the counts."""
    images = []
    for path in sorted(folder.iterdir()):
        reason = _not_an_image(path)
        if reason is None:
            images.append(path)
        elif skipped is not None:
            skipped.append(SkippedFile(path, reason))
    return images


def list_images_recursive(folder: Path, excluded_folders: tuple[str, ...] = ()) -> list[Path]:
    """Image files anywhere under ``folder`` (sorted), except hidden ones and those below a sub-folder
    named in ``excluded_folders``: a folder of generic images (penalty images, distillation, samples)."""
    if not folder.is_dir():
        raise DataError(f"Image folder {folder} does not exist: pass a folder of images.")
    return sorted(
        path
        for path in folder.rglob("*")
        if _not_an_image(path) is None
        and not any(
            part.startswith(".") or part in excluded_folders for part in path.relative_to(folder).parts
        )
    )


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
    if not path.is_dir():
        raise DataError(f"{what} not found: expected folder {path}. {fix}")
    return path
