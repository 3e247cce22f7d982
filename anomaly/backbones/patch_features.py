"""Locally aware patch features (PatchCore, Roth et al. 2022, Sec. 3.1, as its official code builds them).

Each layer's map is unfolded into p×p neighbourhoods, deeper layers' patch grids are interpolated onto
the finest layer's grid (between the cells centred around each finest cell's centre, by the backbone's
geometry at the image's size: :mod:`anomaly.backbones.geometry`), each flattened patch is average-pooled
to a length and the layers are concatenated (and pooled again). PatchCore's memory bank, SimpleNet's
discriminator input and EfficientAD's teacher distillation targets are all these features.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from anomaly.backbones.feature_cache import FrozenNetwork
from anomaly.backbones.geometry import Axis, GridGeometry, resample_linear
from anomaly.errors import ConfigError

OUTPUT = "patch_features"  # the one output's name in a cache file: ``[D, h, w]`` per image


class PatchFeatures(FrozenNetwork):
    """``images [B, 3, H, W]`` in [0, 1] → ``[B, h, w, D]`` patch features on the finest layer's grid.

    Frozen like its backbone, whose outputs the feature cache holds in any case. With ``cache_output`` it
    holds these features too: for a method that sees the same images in every epoch (SimpleNet), where the
    aggregation costs as much as the backbone (Lite0 at 256 px on a CPU); off by default, as the features
    take several times the backbone's maps on disk (1.6 MB per image for SimpleNet's Lite0 default,
    4.2 MB for PatchCore's D = 1024).

    Args:
        backbone: frozen feature extractor; ``forward(images) -> {layer: [B, C, h, w]}`` in the order of
            its ``layers``, finest first, with ``channels`` per layer.
        patch_size: side p of the neighbourhood aggregated around each position (odd).
        pre_embed_dim: each layer's flattened ``C·p·p`` patch is average-pooled to this length;
            ``None``: to the layer's own C, which is exactly the per-channel mean over the neighbourhood.
        target_embed_dim: the concatenated layers are average-pooled to this length (D); ``None``: kept
            concatenated.
        cache_output: these features go through the feature cache (see above) when a run gives it one.
    """

    def __init__(
        self,
        backbone: FrozenNetwork,
        patch_size: int = 3,
        pre_embed_dim: int | None = 1024,
        target_embed_dim: int | None = 1024,
        cache_output: bool = False,
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
        self.cache_output = cache_output
        self.layers = [OUTPUT]
        self.geometry = GridGeometry()

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        through_cache = self.cache_output and self.cache is not None
        outputs = self.cache.features(self, images) if through_cache else self.compute(images)
        return outputs[OUTPUT].permute(0, 2, 3, 1)  # [B, h, w, D], contiguous (see compute)

    @torch.no_grad()
    def compute(self, images: Tensor) -> dict[str, Tensor]:
        """``{OUTPUT: [B, D, h, w]}``, a channels-last view of the ``[B, h, w, D]`` features (the cache keeps
        that layout, so that a read gives the same contiguous tensor). The backbone's own cache applies."""
        feature_maps = list(self.backbone(images).values())
        features = aggregate_patch_features(
            feature_maps,
            self.geometry(self.backbone, images.shape[-2:]),
            self.patch_size,
            self.pre_embed_dim,
            self.target_embed_dim,
        )
        return {OUTPUT: features.permute(0, 3, 1, 2)}

    def description(self) -> tuple:
        """The backbone's class, layers and own description, and the aggregation's sizes (the backbone's
        weights are this module's parameters)."""
        backbone = self.backbone
        aggregation = (self.patch_size, self.pre_embed_dim, self.target_embed_dim)
        return (type(backbone).__qualname__, tuple(backbone.layers), backbone.description(), *aggregation)

    def output_shapes(self, image_size: tuple[int, int]) -> dict[str, torch.Size]:
        """``{OUTPUT: [D, h, w]}`` on the backbone's first layer's grid (no probe through the cache)."""
        first_layer = next(iter(self.backbone.output_shapes(image_size).values()))
        return {OUTPUT: torch.Size([self.dim, *first_layer[1:]])}

    def grid_axes(self, image_size: Sequence[int]) -> tuple[Axis, Axis]:
        """Where the cells of the features' ``h×w`` grid (the first layer's) lie in an image of that size."""
        return self.geometry(self.backbone, image_size)[0]


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
    feature_maps: list[Tensor],
    axes: Sequence[tuple[Axis, Axis]],
    patch_size: int,
    pre_embed_dim: int | None,
    target_embed_dim: int | None,
) -> Tensor:
    """``[B, h, w, D]`` patch features from layer maps ``[B, C_i, h_i, w_i]`` whose cells lie at ``axes``
    (rows, cols per layer; see :class:`PatchFeatures`).

    Deeper layers' patch grids are interpolated (bilinear) onto the first layer's ``h×w`` grid, as the
    official code does on the patch tensors, but between the cells whose centres surround each first-layer
    cell's centre (the official ``F.interpolate`` assumes centres that are off by up to a stride); results
    are concatenated in layer order.
    """
    batch, _, height, width = feature_maps[0].shape
    pooled = []
    for feature_map, layer_axes in zip(feature_maps, axes, strict=True):
        patches = unfold_patches(feature_map, patch_size)  # [B, C·p·p, h_i, w_i]
        if patches.shape[-2:] != (height, width) or layer_axes != axes[0]:
            patches = resample_linear(patches, layer_axes, axes[0], (height, width))
        patches = patches.permute(0, 2, 3, 1).reshape(batch * height * width, -1)  # [B·h·w, C·p·p]
        pooled.append(adaptive_mean(patches, pre_embed_dim or feature_map.shape[1]))
    stacked = torch.cat(pooled, dim=1)  # [B·h·w, sum of pooled sizes]
    if target_embed_dim is not None:
        stacked = adaptive_mean(stacked, target_embed_dim)
    return stacked.reshape(batch, height, width, -1)
