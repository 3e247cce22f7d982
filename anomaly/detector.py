"""A fitted model as a library object: :func:`load` a model file, :meth:`Detector.score` images.

Images go through the training preprocessing that the model file records, so a notebook scores exactly
as ``anomaly-train`` tested and ``anomaly-predict`` scores. The decisions use the model's calibrated
thresholds (their guarantee: ``detector.calibration.describe()``).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from anomaly.calibration import Calibration
from anomaly.data.decode import read_image
from anomaly.data.preprocessing import Preprocessing
from anomaly.device import choose_device
from anomaly.errors import ConfigError, DataError
from anomaly.methods.base import AnomalyModel, check_finite
from anomaly.model_io import load_model

ImageInput = str | Path | Image.Image | np.ndarray | Tensor


@dataclass(frozen=True)
class Detection:
    """The scores of a batch of B images, at the preprocessed size ``H x W``."""

    anomaly_maps: Tensor  # [B, 1, H, W], higher = more anomalous
    scores: Tensor  # [B] image scores
    normalised_scores: Tensor | None  # [B]: 0 a typical good part, 1 at the threshold; None uncalibrated
    is_anomalous: Tensor | None  # [B] bool: score above the calibrated threshold; None uncalibrated
    defect_masks: Tensor | None  # [B, 1, H, W] bool: map above the calibrated pixel threshold


class Detector:
    """A fitted model with its preprocessing and calibration (from :func:`load`)."""

    def __init__(
        self,
        model: AnomalyModel,
        method: str,
        preprocessing: Preprocessing,
        calibration: Calibration | None,
        device: torch.device,
    ) -> None:
        self.model, self.method = model.to(device).eval(), method
        self.preprocessing, self.calibration, self.device = preprocessing, calibration, device
        self._transform = preprocessing.transform()

    def score(self, images: ImageInput | Sequence[ImageInput]) -> Detection:
        """Scores images: file paths, PIL images, ``[H, W, 3]`` arrays, ``[3, H, W]`` or ``[B, 3, H, W]``
        tensors; one image or a non-empty list of them. Arrays and tensors hold uint8, uint16 (scaled to
        8 bits by the high byte, as 16-bit image files are read) or finite floats in [0, 1]."""
        batch = torch.stack(
            [self.preprocess(image, f"image {i}") for i, image in enumerate(_as_list(images))]
        ).to(self.device)
        with torch.inference_mode():
            output = self.model(batch)
        check_finite(output, [f"image {i}" for i in range(len(batch))])
        maps, scores = output.anomaly_map.float().cpu(), output.image_score.float().cpu()
        if self.calibration is None:
            return Detection(maps, scores, None, None, None)
        return Detection(
            maps,
            scores,
            self.calibration.normalise(scores),
            scores > self.calibration.threshold,
            maps > self.calibration.pixel_threshold,
        )

    def preprocess(self, image: ImageInput, name: str = "the image") -> Tensor:
        """One image as the model takes it: ``[3, H, W]`` float in [0, 1] at the training size; ``name``
        says which one in an error."""
        return self._transform(tv_tensors.Image(_as_rgb_uint8(image, name)))


def load(path: str | Path, device: str = "auto") -> Detector:
    """The model ``anomaly-train`` wrote (its run dir, or the ``model.safetensors`` in it), on ``device``
    (``auto``: a GPU when there is one). Loads without executing code and checks every stored value."""
    chosen = choose_device(device)
    loaded = load_model(path, device=str(chosen))
    return Detector(loaded.model, loaded.method, loaded.preprocessing, loaded.calibration, chosen)


ACCEPTED = (
    "file paths, PIL images, [H, W, 3] arrays or [3, H, W] / [B, 3, H, W] tensors (uint8, uint16 or float "
    "in [0, 1]), or a list of them"
)


def _as_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    if isinstance(images, Tensor) and images.ndim == 4:
        batch = list(images)
    elif isinstance(images, str | Path | Image.Image | np.ndarray | Tensor):
        batch = [images]
    elif isinstance(images, list | tuple):
        batch = list(images)
    else:
        raise DataError(f"Detector.score cannot score {_describe(images)}: it takes {ACCEPTED}.")
    if not batch:
        raise DataError(f"Detector.score got no images (an empty {type(images).__name__}): give {ACCEPTED}.")
    return batch


def _describe(value: object) -> str:
    if isinstance(value, bytes | bytearray):
        return (
            f"{len(value)} bytes (encoded file contents?): decode them first, e.g. "
            "PIL.Image.open(io.BytesIO(data)), or pass the file's path"
        )
    if isinstance(value, dict):
        return f"a dict (keys {list(value)[:5]}): pass the image itself, e.g. sample['image']"
    return f"a {type(value).__name__}"


def _as_rgb_uint8(image: ImageInput, name: str) -> Tensor:
    """``[3, H, W]`` uint8 RGB from any accepted input (grey and RGBA become RGB, as in training)."""
    if isinstance(image, str | Path):
        return read_image(image)
    if isinstance(image, Image.Image):
        return F.pil_to_tensor(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ConfigError(
                f"{name}: an image array must be [H, W], [H, W, 3] or [H, W, 4], got {image.shape}"
            )
        image = torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1)
    if not isinstance(image, Tensor):
        raise DataError(f"{name}: cannot score {_describe(image)}: Detector.score takes {ACCEPTED}.")
    if image.ndim != 3 or image.shape[0] != 3:
        raise ConfigError(
            f"{name}: an image tensor must be [3, H, W] (or [B, 3, H, W]), got {list(image.shape)}"
        )
    return _to_uint8(image, name)


def _to_uint8(image: Tensor, name: str) -> Tensor:
    """uint8 as it is; uint16 by its high byte (``v >> 8``, as 16-bit image files are read); floats in
    [0, 1] scaled to 255; every other type, a non-finite value or one outside [0, 1] refused."""
    if image.dtype == torch.uint8:
        return image
    if image.dtype == torch.uint16:
        return (image.to(torch.int32) >> 8).to(torch.uint8)
    if not image.is_floating_point():
        raise DataError(
            f"{name}: cannot score an image of {str(image.dtype).removeprefix('torch.')}: pass uint8 "
            "(0-255), uint16 (0-65535, scaled by its high byte as 16-bit files are) or float in [0, 1]"
        )
    finite = torch.isfinite(image)
    if not finite.all():
        raise DataError(
            f"{name}: {int((~finite).sum())} of its values are not finite (NaN or infinity): a float image "
            "must hold values in [0, 1]; fill or mask them before scoring"
        )
    if image.min() < 0 or image.max() > 1:
        raise ConfigError(
            f"{name}: a float image must hold values in [0, 1] (or pass uint8 in [0, 255]), got "
            f"[{float(image.min()):.4g}, {float(image.max()):.4g}]"
        )
    return (image * 255).round().to(torch.uint8)
