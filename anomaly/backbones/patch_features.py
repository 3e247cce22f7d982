"""Locally aware patch features (PatchCore, Roth et al. 2022, Sec. 3.1, as its official code builds them).

Each layer's map is unfolded into p×p neighbourhoods, deeper layers' patch grids are upsampled to the
finest layer's grid, each flattened patch is average-pooled to a length and the layers are concatenated
(and pooled again). PatchCore's memory bank, SimpleNet's discriminator input and EfficientAD's teacher
distillation targets are all these features.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomaly.errors import ConfigError


class PatchFeatures(nn.Module):
    """``images [B, 3, H, W]`` in [0, 1] → ``[B, h, w, D]`` patch features on the finest layer's grid.

    Args:
        backbone: frozen feature extractor; ``forward(images) -> {layer: [B, C, h, w]}`` in the order of
            its ``layers``, finest first, with ``channels`` per layer.
        patch_size: side p of the neighbourhood aggregated around each position (odd).
        pre_embed_dim: each layer's flattened ``C·p·p`` patch is average-pooled to this length;
            ``None``: to the layer's own C, which is exactly the per-channel mean over the neighbourhood.
        target_embed_dim: the concatenated layers are average-pooled to this length (D); ``None``: kept
            concatenated.
    """

    def __init__(
        self,
        backbone: nn.Module,
        patch_size: int = 3,
        pre_embed_dim: int | None = 1024,
        target_embed_dim: int | None = 1024,
    ) -> None:
        super().__init__()
        if patch_size < 1 or patch_size % 2 == 0:
            raise ConfigError(f"patch_size must be odd and positive, got {patch_size}")
        for name, dim in (("pre_embed_dim", pre_embed_dim), ("target_embed_dim", target_embed_dim)):
            if dim is not None and dim < 1:
                raise ConfigError(f"{name} must be positive or null, got {dim}")
        self.backbone = backbone
        self.patch_size = patch_size
        self.pre_embed_dim = pre_embed_dim
        self.target_embed_dim = target_embed_dim
        self.dim = target_embed_dim or sum(pre_embed_dim or c for c in backbone.channels)  # D

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        feature_maps = list(self.backbone(images).values())
        return aggregate_patch_features(
            feature_maps, self.patch_size, self.pre_embed_dim, self.target_embed_dim
        )


def unfold_patches(feature_map: Tensor, patch_size: int) -> Tensor:
    """``[B, C, h, w] -> [B, C·p·p, h, w]``: each position's p×p neighbourhood (stride 1, zero padding).

    The channel axis is ordered (C, p_row, p_col), the official ``[C, p, p]`` patch flattened.
    """
    batch, channels, height, width = feature_map.shape
    patches = F.unfold(feature_map, kernel_size=patch_size, padding=patch_size // 2)
    return patches.reshape(batch, channels * patch_size**2, height, width)


def adaptive_mean(vectors: Tensor, length: int) -> Tensor:
    """``[N, L] -> [N, length]`` by 1-D adaptive average pooling (repeats values when length > L)."""
    return F.adaptive_avg_pool1d(vectors.unsqueeze(1), length).squeeze(1)


def aggregate_patch_features(
    feature_maps: list[Tensor], patch_size: int, pre_embed_dim: int | None, target_embed_dim: int | None
) -> Tensor:
    """``[B, h, w, D]`` patch features from layer maps ``[B, C_i, h_i, w_i]`` (see :class:`PatchFeatures`).

    Deeper layers' patch grids are upsampled (bilinear) to the first layer's ``h×w`` grid, as the
    official code does on the patch tensors; results are concatenated in layer order.
    """
    batch, _, height, width = feature_maps[0].shape
    pooled = []
    for feature_map in feature_maps:
        patches = unfold_patches(feature_map, patch_size)  # [B, C·p·p, h_i, w_i]
        if patches.shape[-2:] != (height, width):
            patches = F.interpolate(patches, size=(height, width), mode="bilinear", align_corners=False)
        patches = patches.permute(0, 2, 3, 1).reshape(batch * height * width, -1)  # [B·h·w, C·p·p]
        pooled.append(adaptive_mean(patches, pre_embed_dim or feature_map.shape[1]))
    stacked = torch.cat(pooled, dim=1)  # [B·h·w, sum of pooled sizes]
    if target_embed_dim is not None:
        stacked = adaptive_mean(stacked, target_embed_dim)
    return stacked.reshape(batch, height, width, -1)
