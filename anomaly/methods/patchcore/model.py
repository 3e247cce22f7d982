"""PatchCore (Roth et al., CVPR 2022), following the official code (amazon-science/patchcore-inspection).

Every patch of a normal training image is described by its 3×3 feature neighbourhood on two backbone
layers; a greedy coreset of these descriptors is the memory bank, and a test patch is as anomalous as
it is far from its nearest bank entry.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomaly.methods.base import AnomalyOutput, FitOnceModel, register_fitted_buffer
from anomaly.methods.patchcore.coreset import ApproximateGreedyCoreset
from anomaly.methods.patchcore.nearest_neighbors import KNN_BACKENDS, FaissKnn, TorchKnn, build_index
from anomaly.methods.postprocess import upsample_and_blur

_CORESET_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class PatchCore(FitOnceModel):
    """Memory bank of locally aware patch features, scored by nearest-neighbour distance.

    Args:
        backbone: frozen feature extractor; ``forward(images) -> {layer: [B, C, h, w]}`` in the order of
            ``backbone.layers``, the first layer being the finest (its grid is the patch grid).
        pre_embed_dim: each layer's flattened ``C·p·p`` patch is average-pooled to this length;
            ``None``: to the layer's ``C`` (the plain p×p neighbourhood mean; ``aggregate_patch_features``).
        target_embed_dim: the concatenated layers are average-pooled to this length (the bank's D);
            ``None``: kept concatenated.
        patch_size: side p of the neighbourhood aggregated around each position (odd).
        coreset_ratio: fraction of training patches kept in the bank (1 keeps all).
        projection_dim, num_starting_points, coreset_dtype, seed: see :class:`ApproximateGreedyCoreset`.
        num_neighbors: a patch's score is its mean distance to this many nearest bank entries.
        reweight: scale the image score by the paper's Eq. 7 (off in the official code and by default).
        reweight_neighbors: b, the number of bank neighbours of m* in Eq. 7.
        blur_sigma: Gaussian smoothing of the upsampled map, in input pixels (official: 4).
        knn_backend: "auto", "faiss" or "torch" (see :func:`build_index`).
    """

    def __init__(
        self,
        backbone: nn.Module,
        pre_embed_dim: int | None = 1024,
        target_embed_dim: int | None = 1024,
        patch_size: int = 3,
        coreset_ratio: float = 0.1,
        projection_dim: int = 128,
        num_starting_points: int = 10,
        coreset_dtype: str = "float32",
        num_neighbors: int = 1,
        reweight: bool = False,
        reweight_neighbors: int = 9,
        blur_sigma: float = 4.0,
        knn_backend: str = "auto",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if patch_size < 1 or patch_size % 2 == 0:
            raise ValueError(f"patch_size must be odd and positive, got {patch_size}")
        if coreset_dtype not in _CORESET_DTYPES:
            raise ValueError(f"coreset_dtype must be one of {list(_CORESET_DTYPES)}, got {coreset_dtype!r}")
        if knn_backend not in KNN_BACKENDS:
            raise ValueError(f"knn_backend must be one of {KNN_BACKENDS}, got {knn_backend!r}")
        self.backbone = backbone
        self.pre_embed_dim = pre_embed_dim
        self.target_embed_dim = target_embed_dim
        self.patch_size = patch_size
        self.sampler = ApproximateGreedyCoreset(
            coreset_ratio, projection_dim, num_starting_points, _CORESET_DTYPES[coreset_dtype], seed
        )
        self.num_neighbors = num_neighbors
        self.reweight = reweight
        self.reweight_neighbors = reweight_neighbors
        self.blur_sigma = blur_sigma
        self.knn_backend = knn_backend
        self._collected: list[Tensor] = []
        register_fitted_buffer(self, "memory_bank")  # [M, D]
        self._knn: tuple[Tensor, TorchKnn | FaissKnn] | None = None  # (bank it was built from, index)
        self.register_load_state_dict_post_hook(_drop_knn_index)

    @property
    def is_fitted(self) -> bool:
        return self.memory_bank.numel() > 0

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """Patch features ``[B, h·w, D]`` of ``images [B, 3, H, W]`` on the first layer's ``h×w`` grid."""
        features = self._patch_features(images)
        return features.flatten(1, 2)

    def collect(self, images: Tensor) -> None:
        """Keeps the ``B·h·w`` patch features of a batch of normal images (on the model's device)."""
        self._collected.append(self.embed(images).flatten(0, 1))

    def fit(self) -> None:
        """Subsamples everything collected into the memory bank and builds the k-NN index."""
        if not self._collected:
            raise RuntimeError("PatchCore.fit() needs features: call collect() on normal images first")
        features = torch.cat(self._collected)  # [N, D]
        self._collected.clear()
        self.memory_bank = features[self.sampler.select(features)].contiguous()
        self._knn_index()

    @torch.no_grad()
    def forward(self, images: Tensor) -> AnomalyOutput:
        """Anomaly map ``[B, 1, H, W]`` and image score ``[B]`` (max patch score, or Eq. 7 if reweighting)."""
        if not self.is_fitted:
            raise RuntimeError(
                "PatchCore is not fitted: call collect() and fit(), or load a fitted state dict"
            )
        features = self._patch_features(images)  # [B, h, w, D]
        batch, height, width, dim = features.shape
        patches = features.reshape(batch, height * width, dim)
        k = min(self.num_neighbors, len(self.memory_bank))
        distances, indices = self._knn_index().search(patches.flatten(0, 1), k)  # [B·h·w, k]
        patch_scores = distances.mean(dim=1).reshape(batch, height * width)
        if self.reweight:
            nearest = indices[:, 0].reshape(batch, height * width)
            image_scores = self._reweighted_scores(patches, patch_scores, nearest)
        else:
            image_scores = patch_scores.amax(dim=1)
        grid = patch_scores.reshape(batch, 1, height, width)
        anomaly_map = upsample_and_blur(grid, tuple(images.shape[-2:]), self.blur_sigma)
        return AnomalyOutput(anomaly_map, image_scores)

    def _patch_features(self, images: Tensor) -> Tensor:
        """``[B, h, w, D]`` locally aware patch features (official PatchMaker, MeanMapper, Aggregator)."""
        feature_maps = list(self.backbone(images).values())
        return aggregate_patch_features(
            feature_maps, self.patch_size, self.pre_embed_dim, self.target_embed_dim
        )

    def _knn_index(self) -> TorchKnn | FaissKnn:
        """The index over the current memory bank, rebuilt only when the bank tensor was replaced."""
        if self._knn is None or self._knn[0] is not self.memory_bank:
            self._knn = (self.memory_bank, build_index(self.memory_bank, self.knn_backend))
        return self._knn[1]

    def _reweighted_scores(self, features: Tensor, patch_scores: Tensor, nearest: Tensor) -> Tensor:
        """Paper Eq. 7: ``s = (1 - exp‖m_test* - m*‖ / Σ_{m ∈ N_b(m*)} exp‖m_test* - m‖) · s*``.

        ``features [B, L, D]``, ``patch_scores [B, L]``, ``nearest [B, L]`` (bank index of each patch's
        nearest neighbour). ``m_test*`` is the highest-scoring patch, ``m*`` its nearest bank entry and
        ``N_b(m*)`` the b nearest bank entries of ``m*``, which include m* itself (as in anomalib), so the
        factor lies in [0, 1]; it is large when m* is far from the bank's dense regions. Computed as
        ``1 - exp(d* - logsumexp(d))`` so that large distances do not overflow.
        """
        rows = torch.arange(features.shape[0], device=features.device)  # shape, not len(): traceable
        worst = patch_scores.argmax(dim=1)  # [B], m_test*
        test_patch = features[rows, worst]  # [B, D]
        anchor = self.memory_bank[nearest[rows, worst]]  # [B, D], m*
        b = min(self.reweight_neighbors, len(self.memory_bank))
        _, support = self._knn_index().search(anchor, b)  # [B, b], N_b(m*)
        support_dist = torch.linalg.vector_norm(
            test_patch[:, None] - self.memory_bank[support], dim=-1
        )  # [B, b]
        anchor_dist = torch.linalg.vector_norm(test_patch - anchor, dim=-1)  # [B]
        weight = 1 - torch.exp(anchor_dist - torch.logsumexp(support_dist, dim=1))
        return weight.clamp_(min=0) * patch_scores[rows, worst]


def _drop_knn_index(module: PatchCore, incompatible_keys: object) -> None:
    """``load_state_dict`` may copy a new bank into the same tensor, so the cached index is stale."""
    module._knn = None


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
    """``[B, h, w, D]`` patch features from layer maps ``[B, C_i, h_i, w_i]``.

    Each layer is unfolded into p×p neighbourhoods; deeper layers' patch grids are upsampled
    (bilinear) to the first layer's ``h×w`` grid, as the official code does on the patch tensors; each
    flattened patch (channel-major, ``C_i·p·p`` long) is pooled to ``pre_embed_dim`` and the layers'
    results, concatenated in layer order, to ``target_embed_dim`` = D.

    ``pre_embed_dim=None`` pools each layer's patch to its own ``C_i``: exactly the per-channel mean over
    the p×p neighbourhood, the paper's aggregation f_agg without any mixing of channels or positions.
    ``target_embed_dim=None`` concatenates the layers (D = sum of the pooled sizes).
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
