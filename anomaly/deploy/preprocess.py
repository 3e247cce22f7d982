"""The training preprocessing as graph operations: raw camera ``uint8`` images in, model input out.

torchvision's antialiased resize is reproduced bit for bit in integer arithmetic (its CPU ``uint8``
kernel, which the training data loaders run: no ONNX operator matches it), then the centre crop and the
scaling to [0, 1]. The steps are read off :class:`~anomaly.data.preprocessing.Preprocessing` itself.
"""

import math

import numpy as np
import torch
from torch import Tensor, nn
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

from anomaly.data.preprocessing import Preprocessing
from anomaly.errors import ConfigError


def resize_taps(in_size: int, out_size: int) -> tuple[Tensor, Tensor, int]:
    """torch's ``uint8`` antialiased bilinear taps along one axis: source indices ``[out, taps]``, integer
    weights ``[out, taps]`` and their fixed-point precision.

    The float64 weights, their int16 rounding and the precision rule of ATen's
    ``HelperInterpBase::_compute_index_ranges_int16_weights`` (what ``v2.Resize(antialias=True)`` runs on
    ``uint8`` CPU images), so that the exported resize gives identical pixels. Unused taps get weight 0.
    """
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0  # bilinear: half-width 1, widened by the scale when shrinking
    taps = math.ceil(support) * 2 + 1
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    index = torch.zeros(out_size, taps, dtype=torch.int64)
    weights = np.zeros((out_size, taps))
    for i in range(out_size):
        center = scale * (i + 0.5)
        start = max(int(center - support + 0.5), 0)
        size = min(max(min(int(center + support + 0.5), in_size) - start, 0), taps)
        row = [max(0.0, 1.0 - abs((j + start - center + 0.5) * inv_scale)) for j in range(size)]
        total = sum(row)
        weights[i, :size] = [w / total for w in row] if total != 0.0 else row
        index[i] = torch.arange(start, start + taps).clamp(max=in_size - 1)
    precision = 0
    while precision < 22 and int(0.5 + weights.max() * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    fixed = np.floor(0.5 + weights * (1 << precision)).astype(np.int32)
    return index, torch.from_numpy(fixed), precision


class AxisResize(nn.Module):
    """One separable pass of the ``uint8`` antialiased resize over ``dim`` (2 = height, 3 = width).

    Integer arithmetic (int32: 255·2^22 fits), one gather per tap so memory stays that of the output, and
    ``(Σ x·w + 2^(p-1)) >> p`` clamped to [0, 255], as ATen's ``basic_loop_aa_*<uint8_t>``.
    """

    def __init__(self, in_size: int, out_size: int, dim: int) -> None:
        super().__init__()
        index, weights, precision = resize_taps(in_size, out_size)
        self.dim = dim
        self.precision = precision
        self.register_buffer("index", index.T.contiguous())  # [taps, out]
        shape = (-1, out_size, 1) if dim == 2 else (-1, out_size)
        self.register_buffer("weights", weights.T.reshape(shape).contiguous())  # [taps, out(, 1)]

    def forward(self, x: Tensor) -> Tensor:
        total = torch.full((), 1 << (self.precision - 1), dtype=torch.int32, device=x.device)
        for index, weights in zip(self.index, self.weights, strict=True):
            total = total + x.index_select(self.dim, index) * weights
        # non-negative weights: the sum is >= 0, so truncating division is the kernel's right shift
        return torch.div(total, 1 << self.precision, rounding_mode="trunc").clamp(0, 255)


class Preprocess(nn.Module):
    """``uint8 [B, 3, H, W]`` at ``input_size`` → float ``[B, 3, h, w]`` in [0, 1], as the training transform.

    The steps are read off the training transform itself (sizes and crop offsets by running its steps on
    probe images), so the export cannot drift from it; a step it cannot reproduce is an error.
    """

    def __init__(self, input_size: tuple[int, int], preprocessing: Preprocessing) -> None:
        super().__init__()
        height, width = input_size
        passes: list[nn.Module] = []
        self.crop = (0, 0, height, width)  # top, left, height, width
        scaled = False
        for step in preprocessing.transform().transforms:
            if isinstance(step, v2.Resize):
                if InterpolationMode(step.interpolation) != InterpolationMode.BILINEAR or not step.antialias:
                    raise ConfigError(f"cannot reproduce {step}: only bilinear with antialias is supported")
                new_height, new_width = step(torch.zeros(1, height, width, dtype=torch.uint8)).shape[-2:]
                if new_width != width:  # torch resizes the width first, then the height
                    passes.append(AxisResize(width, new_width, dim=3))
                if new_height != height:
                    passes.append(AxisResize(height, new_height, dim=2))
                height, width = new_height, new_width
            elif isinstance(step, v2.CenterCrop):
                self.crop = centre_crop_box(step, height, width)
                height, width = self.crop[2:]
            elif isinstance(step, v2.ToDtype) and step.scale and image_dtype(step) == torch.float32:
                scaled = True
            else:
                raise ConfigError(f"cannot export the training transform step {step}")
        if not scaled:
            raise ConfigError("the training transform does not scale images to [0, 1]; cannot export it")
        self.resize = nn.Sequential(*passes)
        self.output_size = (height, width)

    def forward(self, images: Tensor) -> Tensor:
        x = self.resize(images.to(torch.int32)) if len(self.resize) else images
        top, left, height, width = self.crop
        x = x[:, :, top : top + height, left : left + width]
        return x.to(torch.float32) * (1.0 / 255)  # as ToDtype(scale=True): the same float32 product


def image_dtype(step: v2.ToDtype) -> torch.dtype | None:
    """The dtype ``step`` gives images (its ``dtype`` is one dtype or a per-type dict)."""
    return step.dtype.get(tv_tensors.Image) if isinstance(step.dtype, dict) else step.dtype


def centre_crop_box(step: v2.CenterCrop, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) that ``step`` cuts from a ``height×width`` image, found by cropping an
    image of 1-based pixel numbers; torchvision pads crops larger than the image, which is refused."""
    numbers = torch.arange(1, height * width + 1, dtype=torch.int64).reshape(1, height, width)
    cropped = step(numbers)
    if (cropped == 0).any():
        raise ConfigError(f"crop {step.size} is larger than the resized image {height}x{width}")
    top, left = divmod(int(cropped[0, 0, 0]) - 1, width)
    return top, left, cropped.shape[-2], cropped.shape[-1]


class ExportedModel(nn.Module):
    """Preprocessing + any model of the :class:`~anomaly.methods.base.AnomalyOutput` contract."""

    def __init__(self, preprocess: Preprocess, model: nn.Module) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        output = self.model(self.preprocess(images))
        return output.anomaly_map, output.image_score
