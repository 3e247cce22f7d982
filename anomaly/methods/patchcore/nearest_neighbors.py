"""Exact k-nearest-neighbour search of patch features in the memory bank, with faiss or plain torch.

The index is built once per memory bank (faiss copies the bank into its own storage) and then queried
with every test batch; both backends return Euclidean distances, sorted ascending.
"""

import importlib.util

import numpy as np
import torch
from torch import Tensor

KNN_BACKENDS = ("auto", "faiss", "torch")
_CHUNK_BYTES = 256 * 2**20


class TorchKnn:
    """Exact search by matrix products in query chunks: no full ``[Q, M]`` distance matrix is ever built.

    ``|q - b|² = |q|² - 2 q·b + |b|²``; ``|q|²`` does not change a row's ranking, so it is added after
    ``topk``. Works on any device.
    """

    def __init__(self, bank: Tensor) -> None:
        self.bank = bank  # [M, D]
        self.sq_norms = bank.square().sum(dim=1)  # [M]

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Distances ``[Q, k]`` and bank indices ``[Q, k]`` (int64) of the k nearest of ``queries [Q, D]``."""
        rows = max(1, _CHUNK_BYTES // (4 * len(self.bank)))
        distances, indices = [], []
        for chunk in queries.split(rows):
            partial = torch.addmm(self.sq_norms, chunk, self.bank.T, alpha=-2)  # [Qc, M]: |b|² - 2 q·b
            values, index = partial.topk(k, dim=1, largest=False)
            values += chunk.square().sum(dim=1, keepdim=True)
            distances.append(values.clamp_(min=0).sqrt_())
            indices.append(index)
        return torch.cat(distances), torch.cat(indices)


class FaissKnn:
    """faiss ``IndexFlatL2`` (exact), on the GPU when faiss has GPU support and the bank is on CUDA."""

    def __init__(self, bank: Tensor) -> None:
        import faiss

        index = faiss.IndexFlatL2(bank.shape[1])
        if bank.is_cuda and hasattr(faiss, "StandardGpuResources"):
            self._gpu_resources = faiss.StandardGpuResources()  # must outlive the index
            index = faiss.index_cpu_to_gpu(self._gpu_resources, bank.device.index or 0, index)
        index.add(_as_numpy(bank))
        self.index = index

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Distances ``[Q, k]`` and bank indices ``[Q, k]`` (int64), on the queries' device."""
        sq_distances, indices = self.index.search(_as_numpy(queries), k)
        distances = torch.from_numpy(sq_distances).clamp_(min=0).sqrt_()  # faiss returns squared L2
        return distances.to(queries.device), torch.from_numpy(indices).to(queries.device)


def _as_numpy(tensor: Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).numpy())


def build_index(bank: Tensor, backend: str = "auto") -> TorchKnn | FaissKnn:
    """A search index over ``bank [M, D]``.

    ``"auto"``: faiss for a bank on the CPU, torch for a CUDA bank (no copy to the host). On 2 CPU
    threads, 4096 queries against a 20k bank, faiss took 0.84 s vs torch's 1.05 s at D=1024 and tied
    (0.64 vs 0.62 s) at D=152.
    """
    if backend not in KNN_BACKENDS:
        raise ValueError(f"unknown k-NN backend {backend!r}; expected one of {KNN_BACKENDS}")
    if backend == "auto":
        faiss_available = importlib.util.find_spec("faiss") is not None
        backend = "faiss" if faiss_available and not bank.is_cuda else "torch"
    return FaissKnn(bank) if backend == "faiss" else TorchKnn(bank)


def nearest_distances(queries: Tensor, bank: Tensor, k: int, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Euclidean distances ``[Q, k]`` and indices ``[Q, k]`` of the k nearest ``bank [M, D]`` rows."""
    if not 1 <= k <= len(bank):
        raise ValueError(f"k must be in [1, {len(bank)}] (the bank size), got {k}")
    return build_index(bank, backend).search(queries, k)
