"""PaDiM: a multivariate Gaussian per feature-map position (Defard et al., ICPR 2020).

Follows the paper and its reference code: the backbone's layers (layer1-3 for ResNets) are
concatenated on the first layer's grid (deeper maps interpolated at its cells' centres), ``n_features``
channels are kept by a seeded random selection, and each position gets a mean and a covariance
+ 0.01·I. A test patch scores its Mahalanobis distance; the map is upsampled to the image (each cell
peaking on the pixel its receptive field is centred on, :mod:`anomaly.backbones.geometry`), blurred
(σ = 4) and its maximum is the image score.

Statistics are accumulated streaming (per-position sums of x and x·xᵀ on data shifted by the first
batch's mean), so memory does not grow with the train set. Each batch adds into a float32 sum in place
(one ``baddbmm_``, nothing allocated: 5x faster than a float64 product per batch); that sum is moved
into the float64 total every ``FLOAT32_RUN`` images, which bounds its rounding error.
"""

import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from anomaly.backbones.feature_cache import FrozenNetwork
from anomaly.backbones.geometry import GridGeometry, resample_linear
from anomaly.distributed import LOCAL, Collective
from anomaly.errors import ConfigError, DataError
from anomaly.methods.base import AnomalyOutput, FitOnceModel, register_fitted_buffer
from anomaly.methods.postprocess import check_blur_sigma, upsample_and_blur

FLOAT32_RUN = 1024  # images summed in float32 before the sums move into the float64 totals


class Padim(FitOnceModel):
    def __init__(
        self,
        backbone: FrozenNetwork,
        n_features: int = 100,
        covariance_epsilon: float = 0.01,
        blur_sigma: float = 4.0,
        position_block: int = 1024,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.geometry = GridGeometry()
        total = sum(backbone.channels)
        if not 0 < n_features <= total:
            raise ConfigError(f"n_features must be in [1, {total}] (the layers' channels), got {n_features}")
        if not (0 <= covariance_epsilon < math.inf and position_block >= 1):
            raise ConfigError(
                "covariance_epsilon must be finite and >= 0 and position_block >= 1, got "
                f"{covariance_epsilon}, {position_block}"
            )
        check_blur_sigma(blur_sigma)
        generator = torch.Generator().manual_seed(seed)
        # sorted, so each layer's channels can be picked before upsampling (the distance ignores order)
        selected = torch.randperm(total, generator=generator)[:n_features].sort().values
        self.register_buffer("channel_index", selected)
        self.register_load_state_dict_post_hook(_refuse_unsorted_channels)
        self.covariance_epsilon = covariance_epsilon
        self.blur_sigma = blur_sigma
        self.position_block = position_block
        register_fitted_buffer(self, "mean")  # [P, D]
        register_fitted_buffer(self, "covariance")  # [P, D, D] sample covariance (no ε): for updates
        register_fitted_buffer(self, "inv_covariance")  # [P, D, D] of covariance + ε·I
        register_fitted_buffer(self, "count")  # [] images the statistics are over
        self._count = 0  # images in the float64 totals
        self._run_count = 0  # images in the float32 sums, not yet in the totals
        self._shift: Tensor | None = None  # [P, D]
        self._run_sum: Tensor | None = None  # [P, D] float32
        self._run_outer_sum: Tensor | None = None  # [P, D, D] float32
        self._sum: Tensor | None = None  # [P, D] float64
        self._outer_sum: Tensor | None = None  # [P, D, D] float64

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """Returns embeddings ``[h, w, B, D]`` on the first layer's grid (D = n_features).

        The layers are concatenated on that grid and ``channel_index`` is kept. Deeper layers are
        interpolated linearly at each first-layer cell's centre (by the backbone's geometry at this image
        size); the reference's nearest upsampling repeats deeper cell j over cells 2j and 2j+1 (4j..4j+3
        for layer3), which puts its values 2 px (6 px) off their centres and shifts the map's peak.
        Positions come first so that each position's ``[B, D]`` block is contiguous for the
        batched matmuls; each layer's kept channels are picked before interpolating, then concatenated.
        """
        features = list(self.backbone(images).values())
        axes = self.geometry(self.backbone, images.shape[-2:])
        grid = features[0].shape[-2:]
        parts = []
        for feature, layer_axes, index in zip(features, axes, self._kept_channels_per_layer(), strict=True):
            feature = feature.index_select(1, index)  # [B, D_layer, h_l, w_l]
            if feature.shape[-2:] != grid or layer_axes != axes[0]:
                feature = resample_linear(feature, layer_axes, axes[0], grid)
            parts.append(feature.permute(2, 3, 0, 1))
        return torch.cat(parts, dim=3)

    def _kept_channels_per_layer(self) -> list[Tensor]:
        """``channel_index`` (sorted, over all layers' channels) split into each layer's own indices."""
        kept, offset = [], 0
        for channels in self.backbone.channels:
            in_layer = (self.channel_index >= offset) & (self.channel_index < offset + channels)
            kept.append(self.channel_index[in_layer] - offset)
            offset += channels
        return kept

    @torch.no_grad()
    def collect(self, images: Tensor) -> None:
        x = self.embed(images).flatten(0, 1).float()  # [P, B, D]
        if self._shift is None:
            self._start_sums(x)
        x -= self._shift[:, None]
        self._run_sum += x.sum(dim=1)
        self._run_outer_sum.baddbmm_(x.transpose(1, 2), x)
        self._run_count += x.shape[1]
        if self._run_count >= FLOAT32_RUN:
            self._flush_run()

    def _start_sums(self, x: Tensor) -> None:
        self._shift = x.mean(dim=1)
        positions, dim = self._shift.shape
        self._run_sum = torch.zeros(positions, dim, device=x.device)
        self._run_outer_sum = torch.zeros(positions, dim, dim, device=x.device)
        self._sum = torch.zeros(positions, dim, dtype=torch.float64, device=x.device)
        self._outer_sum = torch.zeros(positions, dim, dim, dtype=torch.float64, device=x.device)

    def _flush_run(self) -> None:
        self._sum += self._run_sum
        self._outer_sum += self._run_outer_sum
        self._count += self._run_count
        self._run_sum.zero_()
        self._run_outer_sum.zero_()
        self._run_count = 0

    @torch.no_grad()
    def fit(self, collective: Collective = LOCAL) -> None:
        """The statistics of everything collected, over all processes when several share the fit: each
        sums its own images, then one exact combination (the same model as one process, up to rounding).
        Fewer images over all processes than :meth:`minimum_training_images` is a DataError."""
        statistics = combine_across_ranks(self._collected_statistics(minimum=1), collective)
        minimum, why = self.minimum_training_images()
        if statistics.count < minimum:
            raise DataError(
                f"PaDiM needs at least {minimum} training images ({why}), got {statistics.count}: add normal "
                "training images, or keep covariance_epsilon > 0 (the paper's 0.01)."
            )
        self._set_statistics(statistics)

    def minimum_training_images(self) -> tuple[int, str]:
        """One image with the ε·I regulariser: its covariance is then 0 + ε·I, and a position's distance the
        Euclidean distance to that image's feature there, divided by √ε. Without it (ε = 0) the covariance
        of n images has rank n − 1 and is invertible only with n > n_features."""
        if self.covariance_epsilon > 0:
            return 1, "a mean per position; the covariance of one image is covariance_epsilon·I"
        dim = len(self.channel_index)
        return (
            dim + 1,
            f"with covariance_epsilon=0 the covariance is invertible only over more than {dim} images",
        )

    @torch.no_grad()
    def update(self, batches: Iterable[Tensor]) -> None:
        """Adds normal images to the fitted statistics: the same model as fitting on all images at once,
        up to float rounding (counts, means and covariances combine exactly; Chan et al. 1979)."""
        for images in batches:
            self.collect(images)
        self._set_statistics(combine(self.statistics(), self._collected_statistics()))

    def statistics(self) -> "Statistics":
        """The fitted Gaussians in float64: count, means ``[P, D]`` and scatter matrices ``[P, D, D]``."""
        count = int(self.count)
        return Statistics(count, self.mean.double(), self.covariance.double() * (count - 1))

    def _collected_statistics(self, minimum: int = 2) -> "Statistics":
        """The statistics of everything collected since the last fit, which frees the collection. A process
        that shares a fit with others needs ``minimum=1`` image of its own (two over all of them)."""
        if self._shift is not None:
            self._flush_run()
        if self._count < minimum:
            where = " in this process" if minimum == 1 else ""
            raise RuntimeError(f"PaDiM needs at least {minimum} training image(s){where}, got {self._count}")
        n = self._count
        shifted_mean = self._sum / n
        # scatter = Σ x·xᵀ − n·m·mᵀ, in place on the float64 total
        scatter = self._outer_sum.baddbmm_(shifted_mean[:, :, None], shifted_mean[:, None, :], alpha=-n)
        statistics = Statistics(n, shifted_mean + self._shift.double(), scatter)
        self._count, self._shift, self._sum, self._outer_sum = 0, None, None, None
        self._run_sum, self._run_outer_sum = None, None
        return statistics

    def _set_statistics(self, statistics: "Statistics") -> None:
        # in place: the statistics are spent; one image has a zero scatter, and covariance 0 (+ ε·I)
        covariance = statistics.scatter.div_(max(statistics.count - 1, 1))
        self.count = torch.tensor(statistics.count, device=statistics.mean.device)
        self.mean = statistics.mean.float()
        self.covariance = covariance.float()
        self.inv_covariance = regularised_inverse(covariance, self.covariance_epsilon)

    @torch.no_grad()
    def cross_fit_scores(
        self,
        folds: Sequence[Callable[[], Iterable[Tensor]]],
        new_model: Callable[[], FitOnceModel],
        collective: Collective = LOCAL,
    ) -> tuple[Tensor, Tensor]:
        """Held-out scores by subtraction: each fold's model is the fitted statistics minus the fold's, so
        the backbone sees each training image once more and nothing is refitted from scratch."""
        total, scores = self.statistics(), []
        for fold in folds:  # with several processes: this rank's block of the fold
            batches = [(self.embed(images).float(), tuple(images.shape[-2:])) for images in fold()]
            embedding = torch.cat([x for x, _ in batches], dim=2)  # [h, w, n_f, D]
            height, width = embedding.shape[:2]
            fold_statistics = combine_across_ranks(embedding_statistics(embedding.flatten(0, 1)), collective)
            rest = subtract(total, fold_statistics)
            covariance = rest.scatter.div_(max(rest.count - 1, 1))
            covariance.diagonal(dim1=-2, dim2=-1).add_(self.covariance_epsilon)
            # Cholesky and a triangular solve: the same distances as through the inverse, at 1/2 the cost
            factor = torch.linalg.cholesky(covariance)  # [P, D, D]
            start = 0
            for x, size in batches:
                delta = (
                    embedding[:, :, start : start + x.shape[2]].flatten(0, 1).double() - rest.mean[:, None]
                )
                solved = torch.linalg.solve_triangular(
                    factor, delta.transpose(1, 2), upper=False
                )  # [P, D, B]
                distances = solved.square_().sum(dim=1).sqrt_().float()  # [P, B]
                scores.append(self._maps(distances, height, width, size).image_score)
                start += x.shape[2]
        image_scores = torch.cat(scores)
        return image_scores, image_scores  # the image score is the map maximum

    @property
    def is_fitted(self) -> bool:
        return self.mean.numel() > 0

    @torch.no_grad()
    def forward(self, images: Tensor) -> AnomalyOutput:
        if not self.is_fitted:
            raise RuntimeError("PaDiM is not fitted: train it (anomaly-train) or load a fitted model first.")
        embedding = self.embed(images)
        height, width = embedding.shape[:2]
        distances = self.mahalanobis(embedding.flatten(0, 1))  # [P, B]
        return self._maps(distances, height, width, tuple(images.shape[-2:]))

    def _maps(self, distances: Tensor, height: int, width: int, image_size: tuple[int, int]) -> AnomalyOutput:
        """Maps and scores from per-position distances ``[P, B]`` on the ``height × width`` grid."""
        patch_scores = distances.T.reshape(-1, 1, height, width)
        axes = self.geometry(self.backbone, image_size)[0]
        anomaly_map = upsample_and_blur(patch_scores, axes, image_size, self.blur_sigma)
        return AnomalyOutput(anomaly_map, anomaly_map.amax(dim=(1, 2, 3)))

    def mahalanobis(self, x: Tensor) -> Tensor:
        """Distances ``[P, B]`` of ``x`` ``[P, B, D]`` to each position's Gaussian, one bmm per block."""
        out = torch.empty(x.shape[:2], dtype=x.dtype, device=x.device)
        for start in range(0, x.shape[0], self.position_block):
            block = slice(start, start + self.position_block)
            delta = x[block] - self.mean[block, None]
            out[block] = (torch.bmm(delta, self.inv_covariance[block]) * delta).sum(-1)
        return out.clamp_min_(0).sqrt_()


class Statistics(NamedTuple):
    """Gaussians per position, in float64: how many images, their means ``[P, D]`` and scatter matrices
    ``[P, D, D]`` (Σ (x − m)(x − m)ᵀ; the sample covariance is scatter / (count − 1))."""

    count: int
    mean: Tensor
    scatter: Tensor

    @property
    def covariance(self) -> Tensor:
        return self.scatter / max(self.count - 1, 1)


def embedding_statistics(x: Tensor) -> Statistics:
    """The statistics of embeddings ``x [P, n, D]`` (float64; the centred products in float32, where
    centring has removed what would cancel)."""
    mean = x.double().mean(dim=1)
    centred = x - mean[:, None].to(x.dtype)
    return Statistics(x.shape[1], mean, torch.bmm(centred.transpose(1, 2), centred).double())


def combine(a: Statistics, b: Statistics) -> Statistics:
    """The statistics of the union of two disjoint sets of images (Chan, Golub and LeVeque's update)."""
    count = a.count + b.count
    delta = b.mean - a.mean
    scatter = (a.scatter + b.scatter).baddbmm_(
        delta[:, :, None], delta[:, None, :], alpha=a.count * b.count / count
    )
    return Statistics(count, a.mean + delta * (b.count / count), scatter)


def combine_across_ranks(local: Statistics, collective: Collective) -> Statistics:
    """The statistics of every process's images (one process: ``local``): the global count and mean by
    one all-reduce, then each rank's scatter about the global mean, ``S_r + n_r (m_r − m)(m_r − m)ᵀ``,
    summed by another (Chan et al.'s combination, for any number of parts at once)."""
    if collective.size == 1:
        return local
    count = int(collective.sum(torch.tensor([local.count], dtype=torch.int64)))
    mean = collective.sum(local.mean * local.count) / count
    delta = local.mean - mean
    scatter = local.scatter.baddbmm(delta[:, :, None], delta[:, None, :], alpha=local.count)
    return Statistics(count, mean, collective.sum(scatter))


def subtract(total: Statistics, part: Statistics) -> Statistics:
    """The statistics of ``total``'s images without ``part``'s (the inverse of :func:`combine`)."""
    count = total.count - part.count
    if count < 1:
        raise RuntimeError(f"PaDiM needs at least 1 image left after removing {part.count} of {total.count}")
    mean = (total.mean * total.count - part.mean * part.count) / count
    delta = part.mean - mean
    scatter = (total.scatter - part.scatter).baddbmm_(
        delta[:, :, None], delta[:, None, :], alpha=-count * part.count / total.count
    )
    return Statistics(count, mean, scatter)


def regularised_inverse(covariance: Tensor, epsilon: float) -> Tensor:
    """float32 inverses ``[P, D, D]`` of covariance + ε·I, computed in float64 through its Cholesky factor
    (the matrix is symmetric positive definite). Not ``torch.linalg.inv``: with MKL 2024.2 (torch 2.14's
    CPU build) its batched LU fails for D >= ~200 ("Pivots given to lu_solve ...") once
    ``torch.set_num_threads`` has been called, as ``num_threads`` and the joblib launcher do."""
    regularised = covariance.to(torch.float64, copy=True)
    regularised.diagonal(dim1=-2, dim2=-1).add_(epsilon)
    return torch.cholesky_inverse(torch.linalg.cholesky(regularised)).float().contiguous()


def _refuse_unsorted_channels(model: Padim, incompatible_keys: object) -> None:
    """Models saved before the channels were kept sorted hold statistics in another channel order."""
    if not bool((model.channel_index[1:] > model.channel_index[:-1]).all()):
        raise RuntimeError(
            "This PaDiM model's channel_index is not sorted: it was saved by an older version of anomaly, "
            "whose statistics are in another channel order. Fit it again with anomaly-train."
        )
