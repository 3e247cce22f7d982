"""Per-channel mean and standard deviation of feature maps, accumulated batch by batch."""

import torch
from torch import Tensor

from anomaly.distributed import LOCAL, Collective
from anomaly.errors import DataError


class ChannelStatistics:
    """Mean and std ``[C]`` over every position of every ``[B, C, h, w]`` map given to :meth:`update`.

    One pass with float64 sums of x and x² (EfficientAD's teacher normalisation, the teacher
    distillation's targets); the reference code's two passes give the same values. With several
    processes the sums are over all of them (through the collective :meth:`compute` gets).
    """

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.squares: Tensor | None = None
        self.count = 0  # positions seen per channel
        self.images = 0

    def update(self, maps: Tensor) -> None:
        maps = maps.double()
        total, squares = maps.sum(dim=(0, 2, 3)), maps.square().sum(dim=(0, 2, 3))
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.count += maps.numel() // maps.shape[1]
        self.images += len(maps)

    def compute(self, collective: Collective = LOCAL) -> tuple[Tensor, Tensor]:
        """float32 ``(mean [C], std [C])`` over every rank's maps; the population std, as the references."""
        if self.count == 0:  # every rank has images (the run checks that there are as many as ranks)
            raise DataError("channel statistics need images, got none (is the training split empty?)")
        total, squares = collective.sum(self.total.clone()), collective.sum(self.squares.clone())
        count = int(collective.sum(torch.tensor([self.count], dtype=torch.int64)))
        mean = total / count
        std = (squares / count - mean.square()).clamp_min(0).sqrt()
        return mean.float(), std.float()
