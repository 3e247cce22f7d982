"""PatchCore (Roth et al., CVPR 2022), following the official code (amazon-science/patchcore-inspection).

Every patch of a normal training image is described by its 3×3 feature neighbourhood on two backbone
layers; a greedy coreset of these descriptors is the memory bank, and a test patch is as anomalous as
it is far from its nearest bank entry.
"""

from collections.abc import Iterable

import torch
from torch import Tensor

from anomaly.backbones.patch_features import PatchFeatures
from anomaly.distributed import LOCAL, Collective
from anomaly.errors import ConfigError
from anomaly.methods.base import AnomalyOutput, FitOnceModel, RunResources, register_fitted_buffer
from anomaly.methods.patchcore.coreset import coreset_sampler
from anomaly.methods.patchcore.nearest_neighbors import KNN_BACKENDS, FaissKnn, TorchKnn, build_index
from anomaly.methods.patchcore.rows import row_offset, take_over_ranks
from anomaly.methods.patchcore.spill import PatchSpill
from anomaly.methods.postprocess import check_blur_sigma, upsample_and_blur

_CORESET_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class PatchCore(FitOnceModel):
    """Memory bank of locally aware patch features, scored by nearest-neighbour distance.

    Args:
        features: the locally aware patch features of a frozen backbone (official: layer2+3, 3×3, 1024).
        coreset_ratio: fraction of training patches kept in the bank, in (0, 1] (1 keeps all).
        projection_dim, num_starting_points, coreset_dtype, seed: see :class:`ApproximateGreedyCoreset`.
        num_neighbors: a patch's score is its mean distance to this many nearest bank entries.
        reweight: scale the image score by the paper's Eq. 7 (off in the official code and by default).
        reweight_neighbors: b, the number of bank neighbours of m* in Eq. 7.
        blur_sigma: Gaussian smoothing of the upsampled map, in input pixels (official: 4).
        knn_backend: "auto", "faiss" or "torch" (see :func:`build_index`).

    ``spill_dir`` (a run resource, not an argument: :meth:`use_resources`) is the folder of the file where
    collected patches wait for :meth:`fit` and :meth:`update` (:class:`PatchSpill`; it has no name and is
    gone after the fit); None: the system temp dir. It is where this machine has room (``paths.spill_dir``):
    never part of the model or its file.
    """

    def __init__(
        self,
        features: PatchFeatures,
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
        if coreset_dtype not in _CORESET_DTYPES:
            raise ConfigError(f"coreset_dtype must be one of {list(_CORESET_DTYPES)}, got {coreset_dtype!r}")
        if knn_backend not in KNN_BACKENDS:
            raise ConfigError(f"knn_backend must be one of {KNN_BACKENDS}, got {knn_backend!r}")
        if num_neighbors < 1 or reweight_neighbors < 1:
            raise ConfigError(f"num_neighbors and reweight_neighbors must be >= 1, got {num_neighbors}, "
                              f"{reweight_neighbors}")  # fmt: skip
        check_blur_sigma(blur_sigma)
        self.features = features
        self.sampler = coreset_sampler(
            coreset_ratio, projection_dim, num_starting_points, _CORESET_DTYPES[coreset_dtype], seed
        )
        self.num_neighbors = num_neighbors
        self.reweight = reweight
        self.reweight_neighbors = reweight_neighbors
        self.blur_sigma = blur_sigma
        self.knn_backend = knn_backend
        self.spill_dir: str | None = None
        self._spill: PatchSpill | None = None  # the patches collected since the last fit
        register_fitted_buffer(self, "memory_bank")  # [M, D]
        self._knn: tuple[Tensor, TorchKnn | FaissKnn] | None = None  # (bank it was built from, index)
        self.register_load_state_dict_post_hook(_drop_knn_index)

    def use_resources(self, resources: RunResources) -> None:
        super().use_resources(resources)
        self.spill_dir = resources.spill_dir

    @property
    def is_fitted(self) -> bool:
        return self.memory_bank.numel() > 0

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """Patch features ``[B, h·w, D]`` of ``images [B, 3, H, W]`` on the first layer's ``h×w`` grid."""
        return self.features(images).flatten(1, 2)

    def collect(self, images: Tensor) -> None:
        """Appends the ``B·h·w`` patch features of a batch of normal images to the spill file: memory holds
        none of them (2.6 M patches at D = 1024 would be 10.6 GB)."""
        if self._spill is None:
            self._spill = PatchSpill(self.spill_dir, self.memory_bank.device)
        self._spill.append(self.embed(images).flatten(0, 1))

    def fit(self, collective: Collective = LOCAL) -> None:
        """Subsamples everything collected into the memory bank and builds the k-NN index.

        Memory holds the projected patches ``[N, projection_dim]`` and the bank, never all patches at full
        width (unless the bank is all of them: ``coreset_ratio`` 1); the spill file is deleted, also on an
        error. On several processes (``trainer=ddp``) each rank has collected its block of the training
        images: the coreset is the one process's, selected over all of them
        (:meth:`ApproximateGreedyCoreset.select`), and every rank ends with the whole bank.
        """
        spill, self._spill = self._spill or PatchSpill(self.spill_dir, self.memory_bank.device), None
        with spill:
            if row_offset(len(spill), collective)[1] == 0:  # on every rank alike
                raise RuntimeError("PatchCore.fit() needs features: call collect() on normal images first")
            self.memory_bank = take_over_ranks(spill, self.sampler.select(spill, collective), collective)
        self._knn_index()

    @torch.no_grad()
    def update(self, batches: Iterable[Tensor]) -> None:
        """Adds the patches of new normal images: the coreset is extended greedily over them, starting from
        the current bank (:meth:`ApproximateGreedyCoreset.extend`); the old bank is kept as it is. The new
        patches wait in a spill file as in :meth:`fit`. In one process (``anomaly-update`` runs in one)."""
        if not self.is_fitted:
            raise RuntimeError("PatchCore.update() extends a fitted memory bank: fit first")
        with PatchSpill(self.spill_dir, self.memory_bank.device) as spill:
            for images in batches:
                spill.append(self.embed(images).flatten(0, 1))
            if not len(spill):
                raise RuntimeError("PatchCore.update() got no images")
            added = spill.take(self.sampler.extend(self.memory_bank, spill))
        self.memory_bank = torch.cat([self.memory_bank, added.to(self.memory_bank.device)]).contiguous()

    @torch.no_grad()
    def forward(self, images: Tensor) -> AnomalyOutput:
        """Anomaly map ``[B, 1, H, W]`` and image score ``[B]`` (max patch score, or Eq. 7 if reweighting)."""
        if not self.is_fitted:
            raise RuntimeError(
                "PatchCore is not fitted: call collect() and fit(), or load a fitted state dict"
            )
        features = self.features(images)  # [B, h, w, D]
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
        image_size = tuple(images.shape[-2:])
        axes = self.features.grid_axes(image_size)
        anomaly_map = upsample_and_blur(grid, axes, image_size, self.blur_sigma)
        return AnomalyOutput(anomaly_map, image_scores)

    def use_graph_safe_ops(self) -> None:
        """faiss cannot be in a graph: the pure-torch search finds the same exact distances (``refine``)."""
        self.knn_backend = "torch"
        self._knn = None

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
