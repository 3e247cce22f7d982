"""How a raw image becomes model input: the one definition that training, prediction and export share.

A frozen value, built by the data module from its config, saved in the model file and read back by
``anomaly-predict`` and ``anomaly-export``, so the three can never drift apart. The backbone's own
normalisation (ImageNet or Lite0 mean/std) is part of the model, not of this.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from anomaly.errors import ConfigError

Size = int | tuple[int, int]  # an int: the shorter side (resize) or a square (crop); a pair: (height, width)


@dataclass(frozen=True)
class Preprocessing:
    """Resize (antialiased bilinear; masks nearest), optional centre crop, then float32 in [0, 1]."""

    image_size: Size
    crop_size: Size | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", _check_size(self.image_size, "dataset.image_size"))
        if self.crop_size is not None:
            object.__setattr__(self, "crop_size", _check_size(self.crop_size, "dataset.crop_size"))

    def transform(self) -> v2.Compose:
        """The torchvision transform of an image and its ``tv_tensors.Mask`` (applied jointly: aligned):
        :meth:`geometric`, then :meth:`to_float`."""
        return v2.Compose([*self.geometric().transforms, self.to_float()])

    def geometric(self) -> v2.Compose:
        """Resize and crop: uint8 in, uint8 out (what the decoded-image cache stores)."""
        size = self.image_size if isinstance(self.image_size, int) else list(self.image_size)
        steps: list[v2.Transform] = [v2.Resize(size, antialias=True)]
        if self.crop_size is not None:
            steps.append(v2.CenterCrop(self.crop_size))
        return v2.Compose(steps)

    @staticmethod
    def to_float() -> v2.ToDtype:
        """The image to float32 in [0, 1]; the mask stays uint8."""
        return v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)

    @property
    def output_size(self) -> tuple[int, int] | None:
        """The (height, width) of every transformed image; None when it follows each image's aspect ratio
        (an int image_size without a crop)."""
        size = self.crop_size if self.crop_size is not None else self.image_size
        if isinstance(size, int):
            return (size, size) if self.crop_size is not None else None
        return size

    def to_dict(self) -> dict:
        """Plain JSON values (pairs as lists)."""
        return {
            "image_size": _plain(self.image_size),
            "crop_size": None if self.crop_size is None else _plain(self.crop_size),
        }

    @classmethod
    def from_dict(cls, values: object) -> "Preprocessing":
        if not isinstance(values, Mapping) or set(values) != {"image_size", "crop_size"}:
            raise ConfigError(f"preprocessing needs exactly image_size and crop_size, got {values!r}")
        return cls(values["image_size"], values["crop_size"])


def _check_size(size: object, name: str) -> Size:
    """A positive int, or a [height, width] pair of positive ints (a list becomes a tuple)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    if (
        isinstance(size, Sequence)
        and not isinstance(size, str)
        and len(size) == 2
        and all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in size)
    ):
        return (size[0], size[1])
    raise ConfigError(f"{name} must be a positive int or [height, width] of positive ints, got {size!r}")


def _plain(size: Size) -> int | list[int]:
    return size if isinstance(size, int) else list(size)
