"""Proof that an exported file computes what the eager PyTorch model computes, on sample images."""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import tv_tensors
from torchvision.transforms import v2

from anomaly.data.decode import read_image
from anomaly.data.preprocessing import Preprocessing
from anomaly.deploy.formats import Run
from anomaly.errors import ParityError


@dataclass
class Parity:
    """Largest differences exported vs eager over all parity batches (``rel`` = |Δ| / |eager|)."""

    map_abs: float = 0.0
    map_rel: float = 0.0
    score_abs: float = 0.0
    score_rel: float = 0.0
    failures: int = 0  # values beyond atol + rtol·|eager|

    def update(
        self, exported: tuple[Tensor, Tensor], eager: tuple[Tensor, Tensor], atol: float, rtol: float
    ) -> None:
        for name, got, want in zip(("map", "score"), exported, eager, strict=True):
            got, want = got.double().cpu(), want.double().cpu()
            if got.shape != want.shape:
                raise ParityError(
                    f"The exported model's {name} has shape {list(got.shape)}, the eager model's "
                    f"{list(want.shape)}: the file is not written. Export the other format (format=onnx or "
                    "format=torchscript), or a fixed batch size (batch=<n>)."
                )
            diff = (got - want).abs()
            rel = (diff / want.abs())[want != 0]
            largest_rel = float(rel.max()) if rel.numel() else 0.0
            setattr(self, f"{name}_abs", max(getattr(self, f"{name}_abs"), float(diff.max())))
            setattr(self, f"{name}_rel", max(getattr(self, f"{name}_rel"), largest_rel))
            self.failures += int((~(diff <= atol + rtol * want.abs())).sum())  # NaN counts as a failure

    def describe(self) -> str:
        return (
            f"anomaly_map max abs diff {self.map_abs:.3g}, max rel diff {self.map_rel:.3g}; "
            f"image_score max abs diff {self.score_abs:.3g}, max rel diff {self.score_rel:.3g}"
        )


def eager_reference(
    model: nn.Module, images: Tensor, transform: v2.Compose, device: torch.device
) -> tuple[Tensor, Tensor]:
    """The eager model on ``uint8`` images through the training transform, image by image on the CPU as
    the data loaders do."""
    batch = torch.stack([transform(tv_tensors.Image(image)) for image in images]).as_subclass(Tensor)
    with torch.no_grad():
        output = model(batch.to(device))
    return output.anomaly_map, output.image_score


def sample_images(files: list[Path], count: int, input_size: tuple[int, int]) -> Tensor:
    """``uint8 [n, 3, H, W]``: up to ``count`` of ``files`` spread over the list, resized to ``input_size``
    (antialiased, as a user would) where they differ."""
    picks = np.linspace(0, len(files) - 1, min(count, len(files))).round().astype(int)
    images = []
    for index in picks:
        image = read_image(files[index])
        if tuple(image.shape[-2:]) != input_size:
            image = v2.functional.resize(image, list(input_size), antialias=True)
        images.append(image)
    return torch.stack(images)


def generated_images(count: int, size: tuple[int, int], seed: int = 0) -> Tensor:
    """``uint8 [count, 3, H, W]`` photo-like images: a tinted surface with smooth shading, texture at three
    scales and sensor noise, each with a foreign blob, so that scores span normal and anomalous values."""
    generator = torch.Generator().manual_seed(seed)
    height, width = size

    def noise(channels: int, cell: int) -> Tensor:
        grid = torch.rand(1, channels, height // cell + 2, width // cell + 2, generator=generator)
        return F.interpolate(grid, size=size, mode="bicubic", align_corners=False)[0]

    rows, cols = torch.arange(height).view(-1, 1) / height, torch.arange(width).view(1, -1) / width
    images = []
    for _ in range(count):
        image = 0.25 + 0.5 * torch.rand(3, 1, 1, generator=generator)
        image = image + 0.25 * (noise(1, max(height, width) // 2) - 0.5)
        image = image + sum(amp * (noise(3, cell) - 0.5) for amp, cell in ((0.15, 16), (0.1, 4), (0.06, 1)))
        centre, radius = torch.rand(2, generator=generator), 0.04 + 0.1 * torch.rand(2, generator=generator)
        blob = ((rows - centre[0]) / radius[0]) ** 2 + ((cols - centre[1]) / radius[1]) ** 2 <= 1
        image = torch.where(blob, torch.rand(3, 1, 1, generator=generator), image)
        images.append((image + 0.02 * torch.randn(3, height, width, generator=generator)).clamp(0, 1))
    return (torch.stack(images) * 255).round().to(torch.uint8)


def parity_batches(images: Tensor, batch: int | None) -> list[Tensor]:
    """Dynamic batch: all images at once and the first alone; a fixed batch: the images in batches of
    that size, the last one filled up cyclically."""
    if batch is None:
        return [images, images[:1]]
    count = math.ceil(len(images) / batch) * batch
    return list(images[torch.arange(count) % len(images)].split(batch))


def check_parity(
    run: Run, reference: nn.Module, device: torch.device, batches: list[Tensor], preprocessing: Preprocessing,
    atol: float, rtol: float,
) -> Parity:  # fmt: skip
    """Runs the exported file and the eager model on ``device`` (fed through the training transform) on
    each batch of ``uint8`` images."""
    parity, steps = Parity(), preprocessing.transform()
    for batch in batches:
        parity.update(run(batch), eager_reference(reference, batch, steps, device), atol, rtol)
    return parity
