"""The few collective operations the methods and the evaluator need when a run spans several processes.

Lightning's DDP (``trainer=ddp``) starts the processes and initialises the default process group (gloo on
CPU, NCCL on CUDA); everything here is a no-op with one process, so the same code serves both. Results
must not depend on the number of processes: each rank holds a contiguous block of the data in data-set
order (rank 0 the first), so that concatenating the ranks' blocks in rank order is the one-process order.
"""

import os

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """Whether this process is one of several (a process group of more than one rank is initialised)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_launching_process() -> bool:
    """Whether this is global rank 0, known before any process group exists: ranks that torchrun, SLURM or
    Lightning's launcher start carry their rank in the environment (RANK, SLURM_PROCID with several tasks,
    Lightning's LOCAL_RANK and NODE_RANK). Rank 0 writes a run's files; the others only compute."""
    if is_distributed():
        return dist.get_rank() == 0
    names = ("RANK", "LOCAL_RANK", "NODE_RANK") + (("SLURM_PROCID",) if _slurm_tasks() > 1 else ())
    return all(int(os.environ.get(name) or 0) == 0 for name in names)


def _slurm_tasks() -> int:
    return int(os.environ.get("SLURM_NTASKS") or 1)


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_gather_rows(local: Tensor) -> Tensor:
    """Every rank's ``[n_r, ...]`` tensor concatenated in rank order, on every rank (``n_r`` may differ),
    on ``local``'s device; they travel on :func:`collective_device`."""
    if not is_distributed():
        return local
    device = collective_device()  # NCCL takes CUDA tensors only
    counts = all_gather_counts(local.shape[0], device)
    padded = local.new_zeros((max(counts), *local.shape[1:]), device=device)
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded.contiguous())
    rows = torch.cat([block[:count] for block, count in zip(gathered, counts, strict=True)])
    return rows.to(local.device)


def all_gather_counts(count: int, device: torch.device | str | None = None) -> list[int]:
    """Every rank's ``count``, in rank order."""
    if not is_distributed():
        return [count]
    local = torch.tensor([count], device=device or collective_device(), dtype=torch.int64)
    gathered = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(gathered, local)
    return [int(value) for value in gathered]


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The element-wise sum over ranks, in place (and returned)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(local: list) -> list:
    """Every rank's list of picklable objects concatenated in rank order, on every rank (a few small
    items, e.g. the heatmap examples)."""
    if not is_distributed():
        return local
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, local)
    return [item for items in gathered for item in items]


def block_range(total: int, ranks: int, index: int) -> range:
    """Rank ``index``'s contiguous block of ``range(total)``: the first ``total % ranks`` blocks one longer,
    as ``torch.chunk``-like splits do; concatenated in rank order they are ``range(total)``."""
    base, extra = divmod(total, ranks)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


def collective_device() -> torch.device:
    """Where a collective's tensors must be: the current GPU under NCCL, else the CPU (gloo, one process)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_max(tensor: Tensor) -> Tensor:
    """The element-wise maximum over ranks, in place (and returned)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor
