"""Reading image and mask files into tensors, with errors that name the file and the fix.

PNG and JPEG go through torchcodec when it is installed and its FFmpeg libraries load (15 ms per
900 × 900 PNG against PIL's 23 ms); everything else, and everything when torchcodec is missing, goes
through PIL. Both paths give identical pixels (tested on the same files): the EXIF orientation is
applied, alpha is dropped, grey is replicated to RGB, and 16-bit images are scaled to 8 bits by their
high byte (``v >> 8``, PIL's own rule for 16-bit RGB) instead of being clipped. 16-bit PNGs always go
through PIL for that reason, and so do animated PNGs, which are refused like every file of several
pages or frames (a multi-page TIFF): which page is the image is the user's choice, never made in silence.
A mask gets its EXIF orientation applied as its image does, and the data check compares sizes after it.
"""

import functools
import io
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms.v2.functional import pil_to_tensor

from anomaly.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pnm")
TORCHCODEC_EXTENSIONS = (".png", ".jpg", ".jpeg")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")  # one channel of more than 8 bits


@functools.cache
def torchcodec_decoder():
    """torchcodec's ``decode_image`` if it imports and decodes here, else None (then PIL does all)."""
    try:
        from torchcodec.decoders import decode_image

        probe = io.BytesIO()
        Image.new("RGB", (1, 1)).save(probe, format="PNG")
        decode_image(torch.frombuffer(bytearray(probe.getvalue()), dtype=torch.uint8), mode="RGB")
    except Exception as error:  # not installed, or FFmpeg's shared libraries are missing (many servers)
        log.debug("torchcodec is not usable here (%s): images are decoded with PIL", error)
        return None
    return decode_image


class MultiPageImageError(DataError):
    """A file with several pages or frames (multi-page TIFF, animated PNG/WebP): one of them is not the
    image, so none is picked in silence."""


def read_image(path: Path | str) -> Tensor:
    """Reads an image as a ``[3, H, W]`` uint8 RGB tensor."""
    path = Path(path)
    decoder = torchcodec_decoder()
    try:
        if decoder is not None and path.suffix.lower() in TORCHCODEC_EXTENSIONS and not _png_needs_pil(path):
            return decoder(str(path), mode="RGB")
        return read_with_pil(path)
    except DataError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, RuntimeError, Image.DecompressionBombError) as error:
        raise DataError(
            f"Cannot read image {path}: {error}. Replace the file with a valid image or delete it."
        ) from error


def read_with_pil(path: Path) -> Tensor:
    """PIL's decoding with the conventions above: ``[3, H, W]`` uint8 RGB."""
    with Image.open(path) as image:
        refuse_multi_page(image, path)
        if _orientation(image) != 1:
            image = ImageOps.exif_transpose(image)
        if image.mode in _SIXTEEN_BIT_MODES:
            values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
            return torch.from_numpy(values.astype(np.uint8)).expand(3, -1, -1).contiguous()
        return pil_to_tensor(image.convert("RGB"))


def refuse_multi_page(image: Image.Image, path: Path) -> None:
    """Raises :class:`MultiPageImageError` for a file of several pages or frames."""
    pages = getattr(image, "n_frames", 1)
    if pages > 1:
        raise MultiPageImageError(
            f"{path} holds {pages} pages or frames; anomaly reads one image per file and does not pick one "
            "in silence. Save each page as a file of its own (e.g. ImageMagick: convert in.tif page-%d.png) "
            "or export the page you mean."
        )


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """``(width, height)`` after the EXIF orientation (what :func:`read_image` returns): orientations 5-8
    turn the image by 90°."""
    width, height = image.size
    return (height, width) if _orientation(image) in (5, 6, 7, 8) else (width, height)


def _orientation(image: Image.Image) -> int:
    return image.getexif().get(ExifTags.Base.Orientation, 1)


def _png_needs_pil(path: Path) -> bool:
    """A PNG that torchcodec would decode differently: 16 bits per sample (IHDR's bit depth) or animated
    (an ``acTL`` chunk before the first ``IDAT``: torchcodec would return frame 1 alone)."""
    with path.open("rb") as handle:
        header = handle.read(25)
        if len(header) < 25 or not header.startswith(_PNG_SIGNATURE):
            return False
        if header[24] == 16:
            return True
        handle.seek(8 + 8 + 13 + 4)  # signature, IHDR's length, type, data and CRC
        while len(chunk := handle.read(8)) == 8:
            length, kind = int.from_bytes(chunk[:4], "big"), chunk[4:]
            if kind in (b"acTL", b"IDAT"):
                return kind == b"acTL"
            handle.seek(length + 4, io.SEEK_CUR)
    return False


def read_image_and_mask(image_path: Path, mask_path: Path | None) -> tuple[Tensor, Tensor]:
    """An image ``[3, H, W]`` and its mask ``[1, H, W]`` (uint8; zeros without a mask file)."""
    image = read_image(image_path)
    height, width = image.shape[-2:]
    if mask_path is None:
        return image, torch.zeros(1, height, width, dtype=torch.uint8)
    return image, read_mask(mask_path, image_path, (width, height))


def read_mask(path: Path, image_path: Path, image_size: tuple[int, int]) -> Tensor:
    """A ground-truth mask as ``[1, H, W]`` uint8 0/1: any non-zero pixel is a defect (MVTec's 0/255,
    VisA's class ids and 0/1 exports alike). It must have its image's ``(width, height)``. A folder of
    masks (MVTec LOCO AD: one file per defect) gives their union."""
    files = (
        sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) if path.is_dir() else [path]
    )
    if not files:
        raise DataError(f"Mask folder {path} (for {image_path}) holds no mask images. Add them or delete it.")
    union = None
    for file in files:
        try:
            with Image.open(file) as mask:
                refuse_multi_page(mask, file)
                defect = _defect_pixels(ImageOps.exif_transpose(mask) if _orientation(mask) != 1 else mask)
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise DataError(
                f"Cannot read mask {file} (for {image_path}): {error}. Replace or delete it."
            ) from error
        height, width = defect.shape
        if (width, height) != image_size:
            raise DataError(
                f"Mask {file} is {width}x{height} but its image {image_path} is "
                f"{image_size[0]}x{image_size[1]}: a mask must have its image's size. Fix or remove the pair."
            )
        union = defect if union is None else union | defect
    return torch.from_numpy(union.astype(np.uint8))[None]


def _defect_pixels(mask: Image.Image) -> np.ndarray:
    """``[H, W]`` bool: non-zero values (grey, 16-bit), palette indices (labelling tools' class ids) or
    colour channels (alpha ignored)."""
    if mask.mode in ("1", "L", "P", "F", *_SIXTEEN_BIT_MODES):
        return np.asarray(mask) != 0
    return np.asarray(mask.convert("RGB")).any(axis=2)
