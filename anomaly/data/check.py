"""Checking every file of a data set before any work, and reporting all problems at once.

Cheap: image headers, a PNG's chunk checksums (which catch truncation and corruption), a JPEG decoded
at 1/8 scale, other formats decoded; masks are decoded (small, and an all-zero mask of a defective
image is a labelling error). Run on a few threads, with a progress bar.
"""

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from anomaly.data.decode import MultiPageImageError, oriented_size, read_mask, refuse_multi_page
from anomaly.data.decoded_cache import DecodedSamples
from anomaly.data.samples import Sample
from anomaly.errors import DataError

PROBLEM_KINDS = {  # kind -> (what it is, the fix)
    "missing_file": (
        "image missing or a broken link",
        "restore the file (or the link's target) or delete it",
    ),
    "unreadable_image": ("unreadable image", "replace the file with a valid image or delete it"),
    "multi_page": (
        "image of several pages or frames (one image per file is read)",
        "save each page as a file of its own, or keep only the page you mean",
    ),
    "missing_mask": (
        "defective image without its mask",
        "add the mask (<stem>_mask.png beside the others) or move the image out of the test set",
    ),
    "unreadable_mask": ("unreadable mask", "replace the mask with a valid image or delete the pair"),
    "mask_size": ("mask of another size than its image", "give the mask its image's size or delete the pair"),
    "empty_mask": (
        "defective image whose mask has no defect pixel",
        "mark the defect in the mask (any non-zero value) or move the image to the good ones",
    ),
}
SHOWN_PER_KIND = 10


@dataclass(frozen=True)
class Problem:
    kind: str  # a key of PROBLEM_KINDS
    sample: Sample
    detail: str  # what was found, naming the file

    def describe(self) -> str:
        return f"{self.sample.image_path}: {self.detail}"


def check_samples(
    samples: Sequence[Sample], description: str = "Checking files", decoded: DecodedSamples | None = None
) -> list[Problem]:
    """Every problem of every sample, in the samples' order. With ``decoded``, a sample whose exact bytes
    passed before is not checked again, and one that passes is remembered (problems never are)."""

    def check(sample: Sample) -> list[Problem]:
        if decoded is not None and decoded.passed_check(sample):
            return []
        problems = check_sample(sample)
        if decoded is not None and not problems:
            decoded.remember_passed(sample)
        return problems

    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(check, samples)
        found = list(tqdm(results, total=len(samples), desc=description, unit="file", leave=False))
    return [problem for problems in found for problem in problems]


def check_sample(sample: Sample) -> list[Problem]:
    """The problems of one sample's image and mask (none: an empty list)."""
    path = sample.image_path
    if not path.is_file():
        return [
            Problem("missing_file", sample, "no such file" + (" (broken link)" if path.is_symlink() else ""))
        ]
    try:
        size = image_size_if_readable(path)
    except MultiPageImageError as error:
        return [Problem("multi_page", sample, _short(error, path))]
    except Exception as error:  # PIL raises many types for damaged files; each one means "unreadable"
        return [Problem("unreadable_image", sample, _short(error, path))]
    if sample.label == 0 or sample.mask_path is None:
        return []
    if not sample.mask_path.exists():
        return [Problem("missing_mask", sample, f"expected {sample.mask_path}")]
    try:
        mask = read_mask(sample.mask_path, path, size)
    except DataError as error:
        kind = "mask_size" if "size" in str(error) else "unreadable_mask"
        kind = "multi_page" if isinstance(error, MultiPageImageError) else kind
        return [Problem(kind, sample, str(error))]
    if not mask.any():
        return [Problem("empty_mask", sample, f"{sample.mask_path} is all zero")]
    return []


def image_size_if_readable(path: Path) -> tuple[int, int]:
    """``(width, height)`` as the run reads the image (EXIF orientation applied), after a cheap integrity
    check; raises on a damaged file or one of several pages."""
    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    with Image.open(path) as image:
        refuse_multi_page(image, path)
        size, oriented, kind = image.size, oriented_size(image), image.format
    with Image.open(path) as image:  # again: PIL's verify must come straight after opening
        if kind == "PNG":
            image.verify()  # every chunk's CRC up to IEND
        elif kind == "JPEG":
            image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            image.load()  # the whole entropy-coded stream, at 1/8 of the pixels
        else:
            image.load()
    return oriented


def _short(error: Exception, path: Path) -> str:
    """The error's message without the path that PIL repeats in it."""
    return str(error).replace(f" {str(path)!r}", "").replace(str(path), "the file") or type(error).__name__


def problem_report(problems: Sequence[Problem], name: str, total: int) -> str:
    """All problems grouped by kind, each group with its fix; at most SHOWN_PER_KIND files per group."""
    lines = [f"Data check of {name}: {len(problems)} problem(s) in {total} samples."]
    for kind, (what, fix) in PROBLEM_KINDS.items():
        group = [problem for problem in problems if problem.kind == kind]
        if not group:
            continue
        lines.append(f"  {what} ({len(group)}): {fix}")
        lines += [f"    {problem.describe()}" for problem in group[:SHOWN_PER_KIND]]
        if len(group) > SHOWN_PER_KIND:
            lines.append(f"    ... and {len(group) - SHOWN_PER_KIND} more")
    return "\n".join(lines)
