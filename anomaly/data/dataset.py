"""The one image dataset: samples read, transformed and returned as dicts (train, test, predict, generic
image folders alike)."""

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors

from anomaly.data.decode import read_image, read_image_and_mask
from anomaly.data.decoded_cache import DecodedSamples
from anomaly.data.samples import (
    Sample,
    SkippedFile,
    describe_skipped,
    list_images_recursive,
    no_images_error,
)
from anomaly.errors import DataError

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """``{"image", "mask", "label", "path", "index", "category"}`` per sample: image ``[3, H, W]`` float in
    [0, 1] and mask ``[1, H, W]`` uint8 0/1 (zeros without ground truth), transformed jointly so that they
    stay aligned; ``index`` is the sample's position in ``samples``, by which scoring finds it whichever
    process's block it came in; ``category`` the sample's (a unified run evaluates each category apart).

    ``with_masks=False``: ``{"image", "label", "path", "index"}`` with ``transform(image)`` only (generic
    image folders: EfficientAD's penalty images, teacher distillation). ``keep_errors=True``: an unreadable
    file becomes ``{"path", "error"}`` instead of raising (prediction reports it and goes on).
    ``decoded``: images and masks are read through it (the same tensors, decoded at most once per file
    content across runs); it must hold the preprocessing that ``transform`` is.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable,
        with_masks: bool = True,
        keep_errors: bool = False,
        decoded: DecodedSamples | None = None,
    ) -> None:
        self.samples = samples
        self.transform = transform
        self.with_masks = with_masks
        self.keep_errors = keep_errors
        self.decoded = decoded

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        path = str(sample.image_path)
        try:
            if not self.with_masks:
                image = _plain(self.transform(tv_tensors.Image(read_image(sample.image_path))))
                return {"image": image, "label": sample.label, "path": path, "index": index}
            if self.decoded is not None:
                image, mask = self.decoded.load(sample)
            else:
                image, mask = read_image_and_mask(sample.image_path, sample.mask_path)
                image, mask = _plain(self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask)))
        except DataError as error:
            if self.keep_errors:
                return {"path": path, "error": str(error)}
            raise
        return {"image": image, "mask": mask, "label": sample.label, "path": path, "index": index,
                "category": sample.category}  # fmt: skip


def _plain(value):
    """tv_tensors back to plain tensors (tuples of them too), so batches collate as plain tensors."""
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    return value.as_subclass(Tensor) if isinstance(value, Tensor) else value


def image_folder(folder: str | Path, transform: Callable) -> ImageDataset:
    """Every image under ``folder`` (recursively) through ``transform``, without masks."""
    skipped: list[SkippedFile] = []
    paths = list_images_recursive(Path(folder), skipped=skipped)
    if not paths:
        raise no_images_error(Path(folder), skipped, "Pass a folder of images.")
    if skipped:
        log.warning("%s: %s", folder, describe_skipped(skipped))
    return ImageDataset([Sample(path, 0, None, "image") for path in paths], transform, with_masks=False)


def endless_image_batches(
    folder: str | Path, transform: Callable, batch_size: int, num_workers: int, seed: int
) -> Iterator:
    """Shuffled batches of ``image_folder(folder, transform)`` images, reshuffled every pass, without end."""
    loader = DataLoader(
        image_folder(folder, transform), batch_size=batch_size, shuffle=True, num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    while True:
        for batch in loader:  # each pass draws a new order from the generator
            yield batch["image"]
