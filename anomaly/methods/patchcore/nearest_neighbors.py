"""Exact k-nearest-neighbour search of patch features in the memory bank, with faiss or plain torch.

The index is built once per memory bank (faiss copies the bank into its own storage) and then queried
with every test batch; both backends return Euclidean distances, sorted ascending.
"""

import importlib.util

import numpy as np
import torch
from torch import Tensor

from anomaly.errors import require

KNN_BACKENDS = ("auto", "faiss", "torch")
_CHUNK_BYTES = 256 * 2**20
_GRAPH_BANK_CHUNK = 4096  # bank rows per distance block when traced for export


class TorchKnn:
    """Exact search by matrix products in query chunks: no full ``[Q, M]`` distance matrix is ever built.

    Ranks by ``|b|² - 2 q·b`` (``|q|²`` does not change a row's ranking), then measures the k found
    neighbours exactly (:func:`refine`). Works on any device. Traced for export (``anomaly-export``), it
    chunks the bank instead: the same arithmetic, in a fixed number of blocks whatever the batch size.
    """

    def __init__(self, bank: Tensor) -> None:
        self.bank = bank  # [M, D]
        self.sq_norms = bank.square().sum(dim=1)  # [M]

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Distances ``[Q, k]`` and bank indices ``[Q, k]`` (int64) of the k nearest of ``queries [Q, D]``."""
        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            return self._search_bank_chunks(queries, k)
        rows = max(1, _CHUNK_BYTES // (4 * len(self.bank)))
        distances, indices = [], []
        for chunk in queries.split(rows):
            partial = torch.addmm(self.sq_norms, chunk, self.bank.T, alpha=-2)  # [Qc, M]: |b|² - 2 q·b
            found = refine(chunk, self.bank, partial.topk(k, dim=1, largest=False)[1])
            distances.append(found[0])
            indices.append(found[1])
        return torch.cat(distances), torch.cat(indices)

    def _search_bank_chunks(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """:meth:`search` for graph export: splitting the queries would give a batch-dependent number of
        blocks, so the bank is split (a block is ``[Q, 4096]``) and the per-block k nearest are merged."""
        values, indices = [], []
        for start in range(0, len(self.bank), _GRAPH_BANK_CHUNK):
            block = slice(start, start + _GRAPH_BANK_CHUNK)
            partial = torch.addmm(self.sq_norms[block], queries, self.bank[block].T, alpha=-2)
            value, index = partial.topk(min(k, partial.shape[1]), dim=1, largest=False)
            values.append(value)
            indices.append(index + start)
        pick = torch.cat(values, dim=1).topk(k, dim=1, largest=False)[1]
        return refine(queries, self.bank, torch.cat(indices, dim=1).gather(1, pick))


class FaissKnn:
    """faiss ``IndexFlatL2`` (exact), on the GPU when faiss has GPU support and the bank is on CUDA."""

    def __init__(self, bank: Tensor) -> None:
        faiss = require("faiss", "faiss-cpu", "PatchCore's k-NN search with faiss", "set knn_backend=torch")
        index = faiss.IndexFlatL2(bank.shape[1])
        if bank.is_cuda and hasattr(faiss, "StandardGpuResources"):
            self._gpu_resources = faiss.StandardGpuResources()  # must outlive the index
            index = faiss.index_cpu_to_gpu(self._gpu_resources, bank.device.index or 0, index)
        index.add(_as_numpy(bank))
        self.index = index
        self.bank = bank  # [M, D], for refine()

    def search(self, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Distances ``[Q, k]`` and bank indices ``[Q, k]`` (int64), on the queries' device."""
        indices = self.index.search(_as_numpy(queries), k)[1]
        return refine(queries, self.bank, torch.from_numpy(indices).to(queries.device))


def refine(queries: Tensor, bank: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Exact distances ``‖q - b‖`` ``[Q, k]`` to the found neighbours ``indices [Q, k]``, re-sorted.

    Ranking by ``|q|² - 2 q·b + |b|²`` loses small distances to cancellation (a patch equal to a bank
    entry came out ~sqrt(eps·|q|²), not 0) and rounds differently in faiss, torch and an exported graph;
    from the differences, every backend gets the same distances up to float rounding.
    """
    distances, order = torch.linalg.vector_norm(queries[:, None] - bank[indices], dim=-1).sort(dim=1)
    return distances, indices.gather(1, order)


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
