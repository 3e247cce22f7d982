"""The collective operations of a run that spans several processes, as one value that the steps take.

Lightning's DDP (``trainer=ddp``) starts the processes and initialises the default process group (gloo on
CPU, NCCL on CUDA). A step that needs every process's data (fitting a fit-once method, a trained method's
``prepare``/``finalize``, the coreset sampler, the evaluator) takes a :class:`Collective` and asks it, as
torchmetrics takes a ``process_group``: :data:`LOCAL` (one process: every call returns its input) by
default, :class:`ProcessGroupCollective` when the Lightning glue
(:func:`anomaly.methods.lightning.collective_of`) runs it on several. This module is the one place that
reads torch.distributed's state; model files never do. Results must not depend on the number of
processes: each rank holds a contiguous block of the data in data-set order (rank 0 the first;
:class:`~anomaly.data.datamodule.ShardSampler` decides the blocks), so that concatenating the ranks'
blocks in rank order is the one-process order.
"""

import os

import torch
import torch.distributed as dist
from torch import Tensor


class Collective:
    """The collective of one process: rank 0 of 1, every operation returns its input.

    Every operation is called by every rank alike (it waits for the others) and takes and returns tensors on
    the caller's device: moving them to where the backend needs them (:attr:`device`) is the collective's job.
    """

    rank = 0
    size = 1
    device = torch.device("cpu")  # where the tensors travel

    def sum(self, tensor: Tensor) -> Tensor:
        """The element-wise sum over ranks, on ``tensor``'s device (``tensor`` may be overwritten)."""
        return tensor

    def max(self, tensor: Tensor) -> Tensor:
        """The element-wise maximum over ranks, on ``tensor``'s device (``tensor`` may be overwritten)."""
        return tensor

    def gather_rows(self, local: Tensor) -> Tensor:
        """Every rank's ``[n_r, ...]`` tensor concatenated in rank order (``n_r`` may differ), on ``local``'s
        device."""
        return local

    def gather_counts(self, count: int) -> list[int]:
        """Every rank's ``count``, in rank order."""
        return [count]

    def gather_objects(self, local: list) -> list:
        """Every rank's list of picklable objects concatenated in rank order (a few small items)."""
        return local


LOCAL = Collective()


class ProcessGroupCollective(Collective):
    """The collective over torch.distributed's default process group (initialised by the launcher)."""

    def __init__(self) -> None:
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        # NCCL takes CUDA tensors only, gloo CPU ones
        nccl = dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def sum(self, tensor: Tensor) -> Tensor:
        return self._reduced(tensor, dist.ReduceOp.SUM)

    def max(self, tensor: Tensor) -> Tensor:
        return self._reduced(tensor, dist.ReduceOp.MAX)

    def _reduced(self, tensor: Tensor, op: dist.ReduceOp) -> Tensor:
        moved = tensor.to(self.device).contiguous()  # the tensor itself where it already is
        dist.all_reduce(moved, op=op)
        return moved.to(tensor.device)

    def gather_rows(self, local: Tensor) -> Tensor:
        counts = self.gather_counts(local.shape[0])
        padded = local.new_zeros((max(counts), *local.shape[1:]), device=self.device)
        padded[: local.shape[0]] = local
        gathered = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(gathered, padded)
        rows = torch.cat([block[:count] for block, count in zip(gathered, counts, strict=True)])
        return rows.to(local.device)

    def gather_counts(self, count: int) -> list[int]:
        local = torch.tensor([count], device=self.device, dtype=torch.int64)
        gathered = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(gathered, local)
        return [int(value) for value in gathered]

    def gather_objects(self, local: list) -> list:
        gathered: list = [None] * self.size
        dist.all_gather_object(gathered, local)
        return [item for items in gathered for item in items]


def process_collective() -> Collective:
    """The collective of this process's group: over the default process group once one of several ranks is
    initialised, else :data:`LOCAL`."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return ProcessGroupCollective()
    return LOCAL


def is_launching_process() -> bool:
    """Whether this process writes a run's files: global rank 0, known before any process group exists
    (ranks that torchrun, SLURM or Lightning's launcher start carry their rank in the environment: RANK,
    SLURM_PROCID with several tasks, Lightning's LOCAL_RANK and NODE_RANK). The other ranks only compute.
    The one place that decides which rank writes."""
    collective = process_collective()
    if collective.size > 1:
        return collective.rank == 0
    names = ("RANK", "LOCAL_RANK", "NODE_RANK") + (("SLURM_PROCID",) if _slurm_tasks() > 1 else ())
    return all(int(os.environ.get(name) or 0) == 0 for name in names)


def _slurm_tasks() -> int:
    return int(os.environ.get("SLURM_NTASKS") or 1)
