"""Tiling: a large image fitted and scored as tiles at full resolution, the tile maps stitched back.

A defect of a few pixels in a 1024-px image vanishes when the image is resized to 256 px. With
``tiling.tile_size`` set, the preprocessed image (``dataset.image_size``, e.g. ``[1024, 1024]``) is cut
into tiles of ``tile_size`` pixels every ``stride`` pixels; a method fits on and scores each tile as an
image of its own, and the tile maps are stitched into one map of the image.

- **Overlaps are averaged**, not maxed: near a tile's border the features see the network's zero padding
  and score higher; the same pixel sits nearer another tile's centre, where its score is unbiased. The
  mean damps those seams, the maximum would keep every one of them.
- **The image score is the maximum of the stitched map**: a method's own image score sees one tile.
- **One shared model** learns every tile (PatchCore's memory bank, SimpleNet, EfficientAD: a tile is an
  image to them), or, with ``per_position``, **one model per tile position** (PaDiM: its statistics are
  per position, and a shared model would mix different parts of the part); per position is for
  fit-once methods, and the positions' models share one frozen backbone.

Splitting is slicing and stitching is padding and adding, so the tiling is part of an exported graph.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomaly.backbones import FeatureExtractor
from anomaly.distributed import LOCAL, Collective
from anomaly.errors import ConfigError
from anomaly.methods.base import AnomalyModel, AnomalyOutput, FitOnceModel, RunResources, TrainedModel


@dataclass(frozen=True)
class Tiling:
    """Where the tiles of an image of ``image_size`` (height, width) lie."""

    tile_size: int
    stride: int
    image_size: tuple[int, int]
    per_position: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", tuple(self.image_size))
        for name in ("tile_size", "stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"tiling.{name} must be a positive int, got {value!r}")
        if self.stride > self.tile_size:
            raise ConfigError(f"tiling.stride ({self.stride}) above tiling.tile_size ({self.tile_size}) "
                              "would leave pixels out: use a stride up to the tile size")  # fmt: skip
        for side, name in zip(self.image_size, ("height", "width"), strict=True):
            if side < self.tile_size or (side - self.tile_size) % self.stride:
                fits = ", ".join(str(self.tile_size + k * self.stride) for k in range(6))
                raise ConfigError(
                    f"An image {name} of {side} px is not covered by tiles of {self.tile_size} px every "
                    f"{self.stride} px: set dataset.image_size (or crop_size) to a size in {fits}, ... "
                    "or change tiling.tile_size / tiling.stride"
                )

    @property
    def offsets(self) -> list[tuple[int, int]]:
        """The (top, left) corner of each tile, row by row."""
        height, width = self.image_size
        rows = range(0, height - self.tile_size + 1, self.stride)
        return [(top, left) for top in rows for left in range(0, width - self.tile_size + 1, self.stride)]

    def split(self, images: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> tiles ``[B, T, C, t, t]``."""
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(
                f"a tiled model takes images of {self.image_size}, got {tuple(images.shape[-2:])}"
            )
        t = self.tile_size
        return torch.stack([images[..., top : top + t, left : left + t] for top, left in self.offsets], dim=1)

    def stitch(self, maps: Tensor) -> Tensor:
        """Tile maps ``[B, T, 1, t, t]`` -> the image's map ``[B, 1, H, W]``, overlaps averaged."""
        height, width = self.image_size
        t = self.tile_size
        total = sum(
            F.pad(maps[:, i], (left, width - left - t, top, height - top - t))
            for i, (top, left) in enumerate(self.offsets)
        )
        return total / self.coverage().to(maps.device, maps.dtype)

    def coverage(self) -> Tensor:
        """How many tiles cover each pixel ``[H, W]``."""
        counts = torch.zeros(self.image_size)
        for top, left in self.offsets:
            counts[top : top + self.tile_size, left : left + self.tile_size] += 1
        return counts

    def to_dict(self) -> dict:
        return {**asdict(self), "image_size": list(self.image_size)}

    @classmethod
    def from_dict(cls, values: object) -> "Tiling | None":
        if values is None:
            return None
        names = {field.name for field in fields(cls)}
        if not isinstance(values, dict) or set(values) != names:
            raise ConfigError(f"a tiling needs {', '.join(sorted(names))}, got {values!r}")
        return cls(**values)


def tile_model(build: Callable[[], AnomalyModel], tiling: Tiling) -> AnomalyModel:
    """The model ``build()`` makes, fitted and scored tile by tile (``per_position``: one per position)."""
    model = build()
    if isinstance(model, FitOnceModel):
        positions = len(tiling.offsets) if tiling.per_position else 1
        models = [model, *(build() for _ in range(positions - 1))]
        share_backbones(models)
        return TiledFitOnceModel(models, tiling)
    if tiling.per_position:
        raise ConfigError(
            f"tiling.per_position: one model per tile position is for fit-once methods (PaDiM, PatchCore); "
            f"{type(model).__name__} is trained by gradient steps and shares one model across tiles"
        )
    return TiledTrainedModel(model, tiling)


def share_backbones(models: Sequence[nn.Module]) -> None:
    """Gives every model the first one's frozen backbones (the same modules): one copy in memory, in the
    model file and in an exported graph, however many tile positions."""
    for name, module in models[0].named_modules():
        if isinstance(module, FeatureExtractor):
            for model in models[1:]:
                model.set_submodule(name, module)


def score_tiles(models: nn.ModuleList, tiling: Tiling, images: Tensor) -> AnomalyOutput:
    """The stitched map ``[B, 1, H, W]`` and its maximum as image score ``[B]``."""
    tiles = tiling.split(images)
    if tiling.per_position:
        maps = torch.stack([model(tiles[:, i]).anomaly_map for i, model in enumerate(models)], dim=1)
    else:
        maps = models[0](tiles.flatten(0, 1)).anomaly_map.unflatten(0, tiles.shape[:2])
    anomaly_map = tiling.stitch(maps)
    return AnomalyOutput(anomaly_map, anomaly_map.amax(dim=(1, 2, 3)))


class TiledFitOnceModel(FitOnceModel):
    """PaDiM or PatchCore on tiles: ``models`` holds one model, or one per tile position."""

    def __init__(self, models: Sequence[FitOnceModel], tiling: Tiling) -> None:
        super().__init__()
        self.models = nn.ModuleList(models)
        self.tiling = tiling

    @property
    def is_fitted(self) -> bool:
        return all(model.is_fitted for model in self.models)

    def forward(self, images: Tensor) -> AnomalyOutput:
        return score_tiles(self.models, self.tiling, images)

    def minimum_training_images(self) -> tuple[int, str]:
        return self.models[0].minimum_training_images()  # each tile model sees at least every image once

    def collect(self, images: Tensor) -> None:
        tiles = self.tiling.split(images)
        if not self.tiling.per_position:
            self.models[0].collect(tiles.flatten(0, 1))
            return
        for i, model in enumerate(self.models):
            model.collect(tiles[:, i])

    def fit(self, collective: Collective = LOCAL) -> None:
        for model in self.models:
            model.fit(collective)

    def use_resources(self, resources: RunResources) -> None:
        for model in self.models:
            model.use_resources(resources)

    def update(self, batches: Iterable[Tensor]) -> None:
        """Each model learns its tiles in one update (one refit of PaDiM's inverses, one greedy extension
        of PatchCore's bank over all new tiles); per position the new images are held while they pass."""
        if not self.tiling.per_position:
            self.models[0].update(self.tiling.split(images).flatten(0, 1) for images in batches)
            return
        batches = list(batches)
        for i, model in enumerate(self.models):
            model.update(self.tiling.split(images)[:, i] for images in batches)

    def use_graph_safe_ops(self) -> None:
        for model in self.models:
            model.use_graph_safe_ops()


class TiledTrainedModel(TrainedModel):
    """SimpleNet or EfficientAD on tiles: one model trained on the tiles of every image."""

    def __init__(self, model: TrainedModel, tiling: Tiling) -> None:
        super().__init__()
        self.models = nn.ModuleList([model])
        self.tiling = tiling

    @property
    def trained_model(self) -> TrainedModel:
        return self.models[0]

    @property
    def is_fitted(self) -> bool:
        return self.models[0].is_fitted

    def forward(self, images: Tensor) -> AnomalyOutput:
        return score_tiles(self.models, self.tiling, images)

    def use_resources(self, resources: RunResources) -> None:
        self.models[0].use_resources(resources)

    def training_loss(self, images: Tensor, *extra: Tensor) -> dict[str, Tensor]:
        return self.models[0].training_loss(self.tiling.split(images).flatten(0, 1), *extra)

    def prepare(self, batches: Iterable[Tensor], collective: Collective = LOCAL) -> None:
        self.models[0].prepare((self.tiling.split(images).flatten(0, 1) for images in batches), collective)

    def finalize(self, batches: Iterable[Tensor], collective: Collective = LOCAL) -> None:
        self.models[0].finalize((self.tiling.split(images).flatten(0, 1) for images in batches), collective)

    def use_graph_safe_ops(self) -> None:
        self.models[0].use_graph_safe_ops()
