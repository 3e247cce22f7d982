"""Metrics against the masks as stored, at each image's own size.

The test loop compares maps with masks resized like the images, which is right for comparing methods at
one input size but hides what resizing loses: a 3-px defect of a 1024-px image has no pixel left in a
256-px mask. Here each map is upsampled to its image's size and compared with the original mask, so
runs at different input sizes (tiled or not) are measured on the same pixels.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import tv_tensors

from anomaly.data.decode import read_image, read_mask
from anomaly.data.preprocessing import Preprocessing
from anomaly.data.samples import Sample
from anomaly.metrics.evaluator import Evaluator


@torch.no_grad()
def full_resolution_metrics(
    model: nn.Module,
    preprocessing: Preprocessing,
    samples: Sequence[Sample],
    threshold: float | None = None,
    pixel_threshold: float | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """:meth:`Evaluator.compute` over ``samples`` (images of one size), maps upsampled (bilinear) to it."""
    transform = preprocessing.transform()
    device = next(model.parameters()).device
    evaluator = Evaluator()
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        images = [read_image(sample.image_path) for sample in batch]
        height, width = images[0].shape[-2:]
        if any(image.shape[-2:] != (height, width) for image in images):
            raise ValueError("full-resolution metrics take images of one size")
        inputs = torch.stack(
            [transform(tv_tensors.Image(image)).as_subclass(torch.Tensor) for image in images]
        )
        output = model(inputs.to(device))
        maps = F.interpolate(output.anomaly_map.float(), size=(height, width), mode="bilinear")
        masks = torch.stack([mask_of(sample, (width, height)) for sample in batch])
        labels = torch.tensor([sample.label for sample in batch])
        evaluator.update(output.image_score.float().cpu(), labels, maps.cpu(), masks)
    return evaluator.compute(threshold, pixel_threshold)


def mask_of(sample: Sample, size: tuple[int, int]) -> torch.Tensor:
    """The sample's mask ``[1, H, W]`` as stored; zeros without one (``size`` is (width, height))."""
    if sample.mask_path is None:
        return torch.zeros(1, size[1], size[0], dtype=torch.uint8)
    return read_mask(sample.mask_path, sample.image_path, size)
