"""Turning patch-level scores into image-sized anomaly maps, as PaDiM and PatchCore both do."""

import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2.functional import gaussian_blur


def blur_kernel_size(sigma: float) -> int:
    """Kernel covering ±4σ, as scipy.ndimage.gaussian_filter (truncate=4) used by the reference code."""
    return 2 * int(4 * sigma + 0.5) + 1


def upsample_and_blur(patch_scores: Tensor, image_size: tuple[int, int], sigma: float) -> Tensor:
    """Bilinear upsampling of ``[B, 1, h, w]`` scores to ``image_size``, then Gaussian smoothing.

    Returns ``[B, 1, H, W]``. ``sigma <= 0`` skips the blur.
    """
    maps = F.interpolate(patch_scores, size=image_size, mode="bilinear", align_corners=False)
    if sigma > 0:
        maps = gaussian_blur(maps, kernel_size=blur_kernel_size(sigma), sigma=sigma)
    return maps
