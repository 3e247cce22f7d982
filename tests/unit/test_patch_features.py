"""Locally aware patch features: the official aggregation order, pooling and upsampling."""

import torch
import torch.nn.functional as F
from torch import Tensor

from anomaly.backbones.geometry import Axis
from anomaly.backbones.patch_features import PatchFeatures, aggregate_patch_features

# cells centred where F.interpolate(align_corners=False) puts them: (i + 0.5)·stride − 0.5
ONE = (Axis(0.0, 1), Axis(0.0, 1))
FINE, COARSE = (Axis(1.5, 4), Axis(1.5, 4)), (Axis(3.5, 8), Axis(3.5, 8))


def neighbourhood(feature_map: Tensor, row: int, col: int) -> Tensor:
    """The zero-padded 3×3 neighbourhood ``[C, 3, 3]`` of one position of ``[C, h, w]``, flattened."""
    padded = F.pad(feature_map, (1, 1, 1, 1))
    return padded[:, row : row + 3, col : col + 3].reshape(-1)


def test_full_dimensions_keep_the_flattened_neighbourhood() -> None:
    feature_map = torch.randn(2, 3, 5, 6)
    features = aggregate_patch_features([feature_map], [ONE], 3, pre_embed_dim=27, target_embed_dim=27)
    assert features.shape == (2, 5, 6, 27)
    for batch, row, col in [(0, 0, 0), (1, 2, 3), (0, 4, 5)]:
        torch.testing.assert_close(features[batch, row, col], neighbourhood(feature_map[batch], row, col))


def test_pooling_order_matches_the_official_mean_mapper_then_aggregator() -> None:
    first, second = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    features = aggregate_patch_features([first, second], [ONE, ONE], 3, pre_embed_dim=9, target_embed_dim=6)
    row, col = 1, 2
    # per layer the 18-long [C, 3, 3] vector is pooled to 9 (means of pairs), then the 18 concatenated
    # values to 6 (means of triples)
    per_layer = [neighbourhood(layer[0], row, col).reshape(9, 2).mean(dim=1) for layer in (first, second)]
    expected = torch.cat(per_layer).reshape(6, 3).mean(dim=1)
    torch.testing.assert_close(features[0, row, col], expected)


def test_deeper_layer_patches_are_upsampled_after_unfolding() -> None:
    fine, coarse = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4)
    features = aggregate_patch_features(
        [fine, coarse], [FINE, COARSE], 3, pre_embed_dim=36, target_embed_dim=72
    )
    assert features.shape == (2, 8, 8, 72)
    coarse_patches = F.unfold(coarse, 3, padding=1).reshape(2, 36, 4, 4)
    upsampled = F.interpolate(coarse_patches, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(features[..., 36:], upsampled.permute(0, 2, 3, 1))
    torch.testing.assert_close(features[1, 3, 5, :36], neighbourhood(fine[1], 3, 5))


def test_null_dims_give_the_neighbourhood_mean_of_each_layer_concatenated() -> None:
    """pre/target_embed_dim=None: per-channel 3x3 means (zero padded), upsampled and concatenated."""
    torch.manual_seed(0)
    fine, coarse = torch.randn(2, 5, 8, 8), torch.randn(2, 7, 4, 4)
    features = aggregate_patch_features(
        [fine, coarse], [FINE, COARSE], 3, pre_embed_dim=None, target_embed_dim=None
    )
    means = [F.avg_pool2d(x, 3, stride=1, padding=1) for x in (fine, coarse)]
    means[1] = F.interpolate(means[1], size=(8, 8), mode="bilinear", align_corners=False)
    expected = torch.cat(means, dim=1).permute(0, 2, 3, 1)  # [B, h, w, 5 + 7]
    assert features.shape == (2, 8, 8, 12)
    assert torch.allclose(features, expected, atol=1e-6)


def test_dimension_is_known_before_any_image(tiny_backbone) -> None:
    backbone = tiny_backbone(layers=("stage2", "stage3"))  # 12 + 16 channels
    assert PatchFeatures(backbone, pre_embed_dim=None, target_embed_dim=None).dim == 28
    assert PatchFeatures(backbone, pre_embed_dim=20, target_embed_dim=None).dim == 40
    features = PatchFeatures(backbone, pre_embed_dim=20, target_embed_dim=30)
    assert features.dim == 30 and features(torch.rand(2, 3, 64, 64)).shape == (2, 8, 8, 30)
