"""Few-shot runs: k normal training images drawn by a seed of their own, and their optional augmentation.

The draw (``dataset.shot_draw``) is independent of the run's ``seed``, so that draws and seeds sweep
separately. The k images are the first k of one permutation of the training images seeded by the draw
alone: nested, the image of k = 1 is among those of k = 2, and so on, so that a learning curve over k
for one draw adds images instead of drawing new ones (less variance between its points). The images of
``dataset.shot_calibration`` are the last of the same permutation: the same for every k, disjoint from
the k images while k ≤ n − shot_calibration.

``dataset.shot_augment=true`` adds fixed symmetric views of each drawn image (:func:`shot_views`), as
AnomalyDINO does with its reference images (Damm et al., WACV 2025, official code: 8 rotations in 45°
steps). Ours are the 8 symmetries of the square (rotations by 90° and their mirror images), which need no
interpolation and no filled corners; images that are not square get the 4 that keep their size.
"""

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path

from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional

from anomaly.data.decode import oriented_size
from anomaly.data.samples import Sample, seeded_order
from anomaly.errors import ConfigError, DataError


def check_shot_settings(shots: object, shot_draw: object, shot_calibration: object) -> None:
    """The few-shot values of ``dataset`` (before any work): a ConfigError naming the value and the fix."""
    if shots is not None and (not _is_int(shots) or shots < 1):
        raise ConfigError(
            f"dataset.shots={shots!r}: a few-shot run fits on k >= 1 normal training images. Set "
            "dataset.shots to a positive int (e.g. 1, 2, 4, 8, 16), or null for all training images."
        )
    if not _is_int(shot_draw) or shot_draw < 0:
        raise ConfigError(
            f"dataset.shot_draw={shot_draw!r}: the draw of the k images is an int >= 0 (0, 1, 2, ... give "
            "different draws; the same value always the same images)."
        )
    if not _is_int(shot_calibration) or shot_calibration < 0:
        raise ConfigError(f"dataset.shot_calibration must be an int >= 0, got {shot_calibration!r}")
    if shot_calibration and shots is None:
        raise ConfigError(
            f"dataset.shot_calibration={shot_calibration} holds out un-drawn images of a few-shot run, but "
            "dataset.shots is null: set dataset.shots=k, or use dataset.calibration_fraction without shots."
        )


def draw_shots(
    train: Sequence[Sample], shots: int, draw: int, held_out: int, name: str
) -> tuple[list[Sample], list[Sample]]:
    """``(drawn, calibration)``: the first ``shots`` and the last ``held_out`` of the training images in
    the permutation seeded by ``draw`` alone, each in data-set order. Too few images is a DataError."""
    if shots + held_out > len(train):
        also = f" plus dataset.shot_calibration={held_out}" if held_out else ""
        raise DataError(
            f"dataset.shots={shots}{also} needs {shots + held_out} normal training images, but {name} has "
            f"{len(train)}: choose dataset.shots <= {len(train) - held_out}, or dataset.shots=null for all "
            "of them."
        )
    order = seeded_order(len(train), draw)
    calibration = order[len(order) - held_out :] if held_out else []
    return [train[i] for i in sorted(order[:shots])], [train[i] for i in sorted(calibration)]


def shot_views(square: bool) -> list[Callable[[Tensor], Tensor]]:
    """The views of an augmented few-shot image ``[C, H, W]``, the identity first: the 8 symmetries of the
    square (rotations by 0, 90, 180, 270° of the image and of its mirror image), or for images that are not
    square the 4 that keep the size (0 and 180°, each mirrored or not)."""
    angles = (0, 90, 180, 270) if square else (0, 180)
    return [partial(_view, angle=angle, mirrored=mirrored) for mirrored in (False, True) for angle in angles]


def all_square(paths: Iterable[Path]) -> bool:
    """Whether every image is square (read from its header, after its EXIF orientation)."""
    for path in paths:
        with Image.open(path) as image:
            width, height = oriented_size(image)
        if width != height:
            return False
    return True


def _view(image: Tensor, angle: int, mirrored: bool) -> Tensor:
    image = functional.horizontal_flip(image) if mirrored else image
    return functional.rotate(image, angle) if angle else image


class ShotViews(Dataset):
    """Every item of ``dataset`` (an ImageDataset of the drawn images) in each of ``views``: item
    ``i * len(views) + v`` is item i in view v (its image and mask); ``index`` is the position here."""

    def __init__(self, dataset: Dataset, views: Sequence[Callable[[Tensor], Tensor]]) -> None:
        self.dataset, self.views = dataset, list(views)

    def __len__(self) -> int:
        return len(self.dataset) * len(self.views)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index // len(self.views)])
        view = self.views[index % len(self.views)]
        item["image"], item["mask"] = view(item["image"]), view(item["mask"])
        return {**item, "index": index}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
