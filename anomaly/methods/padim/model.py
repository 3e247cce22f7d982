"""PaDiM: a multivariate Gaussian per feature-map position (Defard et al., ICPR 2020).

Follows the paper and its reference code: the backbone's layers (layer1-3 for ResNets) are
concatenated on the first layer's grid (deeper maps nearest-upsampled), ``n_features`` channels are
kept by a seeded random selection, and each position gets a mean and a covariance + 0.01·I. A test
patch scores its Mahalanobis distance; the map is upsampled to the image, blurred (σ = 4) and its
maximum is the image score.

Statistics are accumulated streaming (per-position sums of x and x·xᵀ, in float64, on data shifted
by the first batch's mean for numerical safety), so memory does not grow with the train set.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomaly.methods.base import AnomalyOutput, FitOnceModel, register_fitted_buffer
from anomaly.methods.postprocess import upsample_and_blur


class Padim(FitOnceModel):
    def __init__(
        self,
        backbone: nn.Module,
        n_features: int = 100,
        covariance_epsilon: float = 0.01,
        blur_sigma: float = 4.0,
        position_block: int = 1024,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        total = sum(backbone.channels)
        if not 0 < n_features <= total:
            raise ValueError(f"n_features must be in [1, {total}] (the layers' channels), got {n_features}")
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("channel_index", torch.randperm(total, generator=generator)[:n_features])
        self.covariance_epsilon = covariance_epsilon
        self.blur_sigma = blur_sigma
        self.position_block = position_block
        register_fitted_buffer(self, "mean")  # [P, D]
        register_fitted_buffer(self, "inv_covariance")  # [P, D, D]
        self._count = 0
        self._shift: Tensor | None = None  # [P, D]
        self._sum: Tensor | None = None  # [P, D] float64
        self._outer_sum: Tensor | None = None  # [P, D, D] float64

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """Returns ``[B, D, h, w]`` embeddings on the first layer's grid (D = n_features)."""
        features = list(self.backbone(images).values())
        grid = features[0].shape[-2:]
        resized = [features[0]] + [F.interpolate(f, size=grid, mode="nearest") for f in features[1:]]
        return torch.cat(resized, dim=1).index_select(1, self.channel_index)

    @torch.no_grad()
    def collect(self, images: Tensor) -> None:
        x = positions_first(self.embed(images)).float()  # [P, B, D]
        if self._shift is None:
            self._shift = x.mean(dim=1)
            positions, dim = self._shift.shape
            self._sum = torch.zeros(positions, dim, dtype=torch.float64, device=x.device)
            self._outer_sum = torch.zeros(positions, dim, dim, dtype=torch.float64, device=x.device)
        x = x - self._shift[:, None]
        self._sum += x.sum(dim=1).double()
        self._outer_sum += torch.bmm(x.transpose(1, 2), x).double()
        self._count += x.shape[1]

    @torch.no_grad()
    def fit(self) -> None:
        if self._count < 2:
            raise RuntimeError(f"PaDiM needs at least 2 training images, got {self._count}")
        n = self._count
        shifted_mean = self._sum / n
        covariance = (self._outer_sum - n * shifted_mean[:, :, None] * shifted_mean[:, None, :]) / (n - 1)
        eye = torch.eye(covariance.shape[-1], dtype=covariance.dtype, device=covariance.device)
        covariance += self.covariance_epsilon * eye
        self.mean = (shifted_mean + self._shift.double()).float()
        self.inv_covariance = torch.linalg.inv(covariance).float().contiguous()
        self._count, self._shift, self._sum, self._outer_sum = 0, None, None, None

    @property
    def is_fitted(self) -> bool:
        return self.mean.numel() > 0

    @torch.no_grad()
    def forward(self, images: Tensor) -> AnomalyOutput:
        if not self.is_fitted:
            raise RuntimeError("PaDiM is not fitted: train it (anomaly-train) or load a fitted model first.")
        embedding = self.embed(images)
        batch, _, height, width = embedding.shape
        distances = self.mahalanobis(positions_first(embedding))  # [P, B]
        patch_scores = distances.T.reshape(batch, 1, height, width)
        anomaly_map = upsample_and_blur(patch_scores, tuple(images.shape[-2:]), self.blur_sigma)
        return AnomalyOutput(anomaly_map, anomaly_map.amax(dim=(1, 2, 3)))

    def mahalanobis(self, x: Tensor) -> Tensor:
        """Distances ``[P, B]`` of ``x`` ``[P, B, D]`` to each position's Gaussian, one bmm per block."""
        out = torch.empty(x.shape[:2], dtype=x.dtype, device=x.device)
        for start in range(0, x.shape[0], self.position_block):
            block = slice(start, start + self.position_block)
            delta = x[block] - self.mean[block, None]
            out[block] = (torch.bmm(delta, self.inv_covariance[block]) * delta).sum(-1)
        return out.clamp_min_(0).sqrt_()


def positions_first(embedding: Tensor) -> Tensor:
    """``[B, D, h, w]`` → contiguous ``[h·w, B, D]``: batched matmuls over strided views are ~8x slower."""
    return embedding.flatten(2).permute(2, 0, 1).contiguous()
