"""Patch features read in blocks of rows: the protocol the coreset sampler reads, and taking selected rows.

The features ``[N, D]`` are a tensor (:class:`TensorRows`) or PatchCore's spill file
(:class:`~anomaly.methods.patchcore.spill.PatchSpill`), which holds them on disk while they are collected.
On several processes each rank's rows are its block of all of them, in rank order.
"""

from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor

from anomaly.distributed import Collective

_SUM_BLOCK_ROWS = 1024  # rows per float64 partial sum (column_sums)


class PatchRows(Protocol):
    """Patch features ``[N, D]`` read in blocks of rows. On several processes, this rank's block."""

    device: torch.device  # where the projected points and the selected rows are made

    def __len__(self) -> int: ...

    def feature_sum(self) -> Tensor:
        """Column sums ``[D]`` (float64); ``[0]`` when there are no rows."""
        ...

    def blocks(self, rows: int) -> Iterator[Tensor]:
        """The rows in order, ``[<= rows, D]`` at a time."""
        ...

    def take(self, indices: Tensor) -> Tensor:
        """The rows at ``indices [M]`` (in ``[0, N)``), ``[M, D]`` float32, in that order."""
        ...


class TensorRows:
    """:class:`PatchRows` of a tensor ``[N, D]`` in memory."""

    def __init__(self, features: Tensor) -> None:
        self.features = features
        self.device = features.device

    def __len__(self) -> int:
        return len(self.features)

    def feature_sum(self) -> Tensor:
        return column_sums(self.features)

    def blocks(self, rows: int) -> Iterator[Tensor]:
        return iter(self.features.split(rows))

    def take(self, indices: Tensor) -> Tensor:
        return self.features[indices.to(self.device)].float()


def as_rows(features: Tensor | PatchRows) -> PatchRows:
    return TensorRows(features) if isinstance(features, Tensor) else features


def column_sums(rows: Tensor) -> Tensor:
    """Column sums ``[D]`` (float64) of ``rows [n, D]``, a block of rows at a time: ``sum(dtype=float64)``
    of them all would first copy them all to float64."""
    total = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
    for block in rows.split(_SUM_BLOCK_ROWS):
        total += block.sum(dim=0, dtype=torch.float64)
    return total


def row_offset(num_rows: int, collective: Collective) -> tuple[int, int]:
    """(the index of this rank's first row among all ranks' rows, the number of those), this rank holding
    ``num_rows``; one process: ``(0, num_rows)``."""
    counts = collective.gather_counts(num_rows)
    return sum(counts[: collective.rank]), sum(counts)


def take_over_ranks(rows: PatchRows, selected: Tensor, collective: Collective) -> Tensor:
    """The rows ``selected [M]`` (indices over all ranks' rows, in rank order) as ``[M, D]`` on the rows'
    device, on every rank: each rank reads the rows it holds into zeros, and the sum over ranks is every
    row exactly (a value plus zeros)."""
    if collective.size == 1:
        return rows.take(selected).to(rows.device)
    offset = row_offset(len(rows), collective)[0]
    dim = max(collective.gather_counts(len(rows.feature_sum())))  # D = 0 on a rank without rows
    local = selected.cpu() - offset
    mine = ((local >= 0) & (local < len(rows))).nonzero().squeeze(1)
    taken = torch.zeros(len(selected), dim)
    if len(mine):
        taken[mine] = rows.take(local[mine]).cpu()
    return collective.sum(taken).to(rows.device)
