"""Map post-processing: the separable blur equals torchvision's, upsampling keeps the peak in place."""

import torch
from torchvision.transforms.v2.functional import gaussian_blur as torchvision_blur

from anomaly.backbones.geometry import Axis
from anomaly.methods.postprocess import blur_kernel_size, gaussian_blur, upsample_and_blur


def test_separable_blur_equals_torchvision():
    maps = torch.rand(3, 1, 50, 70) * 10
    expected = torchvision_blur(maps, kernel_size=blur_kernel_size(4.0), sigma=4.0)
    torch.testing.assert_close(gaussian_blur(maps, 4.0), expected, rtol=1e-5, atol=1e-5)


def test_upsampled_map_has_image_size_and_keeps_the_peak_place():
    scores = torch.zeros(1, 1, 8, 8)
    scores[0, 0, 2, 5] = 1.0
    maps = upsample_and_blur(scores, (Axis(3.5, 8), Axis(3.5, 8)), (64, 64), sigma=4.0)
    assert maps.shape == (1, 1, 64, 64)
    row, col = divmod(int(maps.argmax()), 64)
    assert 16 <= row < 24 and 40 <= col < 48
