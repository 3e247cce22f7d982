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


def test_each_cell_peaks_on_the_pixel_its_centre_is_given_at():
    """Cells on pixels 3 + 4i (rows) and 1 + 8j (cols): one hot cell (2, 5) peaks on pixel (11, 41),
    with and without the blur; F.interpolate would put it at (9.5, 43.5)."""
    scores = torch.zeros(1, 1, 16, 8)
    scores[0, 0, 2, 5] = 1.0
    for sigma in (0.0, 4.0):
        maps = upsample_and_blur(scores, (Axis(3.0, 4), Axis(1.0, 8)), (61, 66), sigma=sigma)
        assert maps.shape == (1, 1, 61, 66)
        assert divmod(int(maps.argmax()), 66) == (11, 41)
