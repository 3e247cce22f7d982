"""Decoded, resized images and passed data checks, keyed on the files' bytes: what lets a sweep's later runs
skip decoding.

The feature cache (:mod:`anomaly.backbones.feature_cache`) is keyed on the preprocessed image tensor, so
without this every run still decodes and resizes every image before it can look its features up: ~25 ms
per 900 × 900 PNG on one core, and the data check's CRC pass another ~28 ms, where hashing the file costs
~0.6 ms. Here the key is the file's sha256 (never its path or time) with the mask's, the preprocessing and
the torch/torchvision versions (the resize's numerics); the value is the preprocessing's geometric output
(uint8 image ``[3, h, w]`` and mask ``[1, h, w]``, before the float conversion, which is applied after the
read exactly as :meth:`Preprocessing.transform` applies it: the same tensors bit for bit). A data check
that found nothing wrong is remembered the same way (the file's bytes, its mask's, its label): a file whose
exact bytes passed once passes again. A problem is never remembered: it is found and reported every run.

Both live in the feature cache's :class:`FeatureStore`, in its folder ``decoded/`` (one cap and eviction
for both, atomic writes, a damaged file deleted and recomputed, safetensors only), so ``cache=false``
turns them off with it and ``anomaly-cache clear`` clears them.
"""

import contextlib
import hashlib
from pathlib import Path

import PIL
import torch
import torchvision
from torch import Tensor
from torchvision import tv_tensors

from anomaly.backbones.feature_cache import FeatureStore
from anomaly.data.decode import IMAGE_EXTENSIONS, read_image_and_mask
from anomaly.data.preprocessing import Preprocessing
from anomaly.data.samples import Sample

DECODED = "decoded"  # the feature cache's folder for these files
CHECK_VERSION = "data-check/1"  # bump when the data check finds more (a remembered pass would hide it)
DECODED_VERSION = "decoded/1"
PASSED = torch.ones(1, dtype=torch.uint8)  # a remembered check's file holds this (safetensors needs a tensor)


def file_digest(path: Path) -> str:
    """sha256 of the file's bytes (~0.6 ms for a 0.5 MB PNG); of a folder of masks (MVTec LOCO AD: one
    file per defect, read as their union), of its mask files' names and bytes."""
    if not path.is_dir():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
        digest.update(f"{file.name}:{file_digest(file)}".encode())
    return digest.hexdigest()


def _key(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


class DecodedSamples:
    """A data set's samples decoded and preprocessed at most once per content, and its data checks passed
    at most once per content, in ``store``."""

    def __init__(self, store: FeatureStore, preprocessing: Preprocessing) -> None:
        self.store = store
        self.preprocessing = preprocessing
        self.geometric = preprocessing.geometric()
        self.to_float = preprocessing.to_float()

    def _digests(self, sample: Sample) -> tuple[str, str | None]:
        mask = None if sample.mask_path is None else file_digest(sample.mask_path)
        return file_digest(sample.image_path), mask

    def passed_check(self, sample: Sample) -> bool:
        """Whether these exact bytes (image and mask, with this label) passed the data check before; False
        when a file cannot be read (the check then says why)."""
        try:
            entry = self.store.read(self._check_key(sample))
        except OSError:
            return False
        return entry is not None and "passed" in entry[0]

    def remember_passed(self, sample: Sample) -> None:
        """Records that the sample passed the data check (called only when it found nothing wrong)."""
        with contextlib.suppress(OSError):  # the file went away since the check: checked again next time
            self.store.write(self._check_key(sample), {"passed": PASSED}, {})

    def _check_key(self, sample: Sample) -> str:
        return _key(CHECK_VERSION, *self._digests(sample), sample.label, PIL.__version__)

    def load(self, sample: Sample) -> tuple[Tensor, Tensor]:
        """``preprocessing.transform()`` of the sample's image and mask: image ``[3, h, w]`` float32 in
        [0, 1], mask ``[1, h, w]`` uint8 (zeros without one); decoded and resized only on a miss."""
        try:
            image_digest, mask_digest = self._digests(sample)
        except OSError:  # gone or unreadable since the data check: the decoder names the file and the fix
            return self._float(*self._decode(sample))
        key = _key(DECODED_VERSION, image_digest, mask_digest, self.preprocessing.to_dict(),
                   torch.__version__, torchvision.__version__)  # fmt: skip
        image, mask = self._read(key, with_mask=mask_digest is not None)
        if image is None:
            image, mask = self._decode(sample)
            self.store.write(key, {"image": image} | ({} if sample.mask_path is None else {"mask": mask}), {})
        elif mask is None:
            mask = torch.zeros(1, *image.shape[-2:], dtype=torch.uint8)
        return self._float(image, mask)

    def _float(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        image, mask = self.to_float(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return image.as_subclass(Tensor), mask.as_subclass(Tensor)

    def _read(self, key: str, with_mask: bool) -> tuple[Tensor | None, Tensor | None]:
        """The stored geometric outputs; (None, None) when absent or damaged (then deleted, said, redone)."""
        entry = self.store.read(key)
        if entry is None:
            return None, None
        tensors = entry[0]
        image, mask = tensors.get("image"), tensors.get("mask")
        size = self.preprocessing.output_size
        if (
            image is None
            or image.dtype != torch.uint8
            or image.ndim != 3
            or image.shape[0] != 3
            or (size is not None and tuple(image.shape[-2:]) != size)
            or with_mask != (mask is not None)
            or (mask is not None and (mask.dtype != torch.uint8 or mask.shape != (1, *image.shape[-2:])))
        ):
            self.store.discard(key, "not a decoded image of this preprocessing")
            return None, None
        return image, mask

    def _decode(self, sample: Sample) -> tuple[Tensor, Tensor]:
        """Decoded and resized/cropped as the run's transform does, before its float conversion."""
        image, mask = read_image_and_mask(sample.image_path, sample.mask_path)
        image, mask = self.geometric(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return image.as_subclass(Tensor).contiguous(), mask.as_subclass(Tensor).contiguous()
