"""Per-channel mean and standard deviation of feature maps, accumulated batch by batch."""

import torch
from torch import Tensor

from anomaly import distributed
from anomaly.errors import DataError


class ChannelStatistics:
    """Mean and std ``[C]`` over every position of every ``[B, C, h, w]`` map given to :meth:`update`.

    One pass with float64 sums of x and x² (EfficientAD's teacher normalisation, the teacher
    distillation's targets); the reference code's two passes give the same values. With several
    processes the sums are over all of them.
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

    def compute(self) -> tuple[Tensor, Tensor]:
        """float32 ``(mean [C], std [C])``; the population std, as the references."""
        if self.count == 0:
            raise DataError("channel statistics need images, got none (is the training split empty?)")
        total, squares, count = self.total, self.squares, self.count
        if distributed.is_distributed():  # over every process's images
            total, squares = (
                distributed.all_reduce_sum(total.clone()),
                distributed.all_reduce_sum(squares.clone()),
            )
            count = int(distributed.all_reduce_sum(torch.tensor([float(count)], dtype=torch.float64,
                                                                device=total.device)))  # fmt: skip
        mean = total / count
        std = (squares / count - mean.square()).clamp_min(0).sqrt()
        return mean.float(), std.float()
