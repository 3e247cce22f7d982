"""Arithmetic whose every result is the same bits wherever a row is: in which block, process or thread count.

What lets the coreset be the one-process selection on several processes, and lets pruning skip points
without changing it: BLAS picks its kernel and splits its sums by the shape of a product and the thread
count, so a row's projection or distance computed among other rows could round differently. Here every
projection product has one shape on one thread (:func:`project`), and every matrix-vector product a
multiple of 64 rows (:func:`dot_rows`).
"""

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from anomaly.methods.patchcore.rows import PatchRows, as_rows

PROJECTION_BLOCK_ROWS = 8192  # rows per projection product; every product has this shape (see project)
_DOT_BLOCK_ROWS = 64  # BLAS only ever gets multiples of this many rows in a matrix-vector product


def projection_matrix(
    in_dim: int, dim: int, generator: torch.Generator, device: torch.device
) -> Tensor | None:
    """The seeded ``[in_dim, dim]`` projection, U(-1/sqrt(D), 1/sqrt(D)); None when D <= dim."""
    if in_dim <= dim:
        return None
    bound = in_dim**-0.5
    return ((torch.rand(in_dim, dim, generator=generator) * 2 - 1) * bound).to(device)


def project(features: Tensor | PatchRows, matrix: Tensor | None, mean: Tensor, dtype: torch.dtype) -> Tensor:
    """``(features - mean) @ matrix`` ``[N, P]`` in ``dtype`` (``features - mean`` if ``matrix`` is None), on
    the features' device, a block of rows at a time so that the float32 temporaries stay small.

    Every product has the one shape ``[PROJECTION_BLOCK_ROWS, D] @ [D, P]`` (the last block padded with
    stale rows, which no output row depends on) and runs on one CPU thread. BLAS picks its kernel and splits
    its sums by the shape and the thread count (MKL at D = 1024: a row projected among 1,000 rows, among
    65,536, or with 2 threads instead of 1, differs in the last bit), so this way a point's projection is
    the same bits in whichever block, process or run it is computed. One thread costs seconds at most,
    next to minutes of greedy loop.
    """
    rows = as_rows(features)
    cols = len(mean) if matrix is None else matrix.shape[1]
    out = empty_for_gemv(len(rows), cols, dtype, rows.device)
    block = torch.zeros(PROJECTION_BLOCK_ROWS, len(mean), device=rows.device)  # [B, D]
    product = block if matrix is None else block.new_empty(PROJECTION_BLOCK_ROWS, cols)  # [B, P]
    start = 0
    with single_cpu_thread():
        for chunk in rows.blocks(PROJECTION_BLOCK_ROWS):
            torch.sub(chunk.to(block.device, torch.float32), mean, out=block[: len(chunk)])
            if matrix is not None:
                torch.mm(block, matrix, out=product)
            out[start : start + len(chunk)] = product[: len(chunk)]
            start += len(chunk)
    return out


@contextlib.contextmanager
def single_cpu_thread() -> Iterator[None]:
    """Runs the block on one intra-op CPU thread (see :func:`project`), then restores the caller's count.

    A scoped setting, not a change for the process: torch's OpenMP build keeps the intra-op count per
    thread (OpenMP's per-thread setting and MKL's thread-local one), so a thread that already ran torch
    keeps its own count while another projects here, and the saved count is this thread's own (a count
    shared by the threads would need a lock, and a block entered while another holds it would then run on
    that thread's full count, with other bits).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def empty_for_gemv(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised ``[rows, cols]`` matrix stored in the layout where ``torch.mv`` on it is fastest.

    Measured on 2 CPU cores, N=214k, P=128: float32 4.6 ms column-major vs 16 ms row-major (MKL);
    float16 2.8 ms row-major vs 12 ms column-major (torch's own fp16 kernel).
    """
    if dtype == torch.float16:
        return torch.empty(rows, cols, dtype=dtype, device=device)
    return torch.empty(cols, rows, dtype=dtype, device=device).t()


def in_gemv_layout(points: Tensor) -> Tensor:
    """``points [N, P]`` itself if it has :func:`empty_for_gemv`'s layout, else a copy that has."""
    target = empty_for_gemv(len(points), points.shape[1], points.dtype, points.device)
    return points if target.stride() == points.stride() else target.copy_(points)


def dot_rows(rows: Tensor, vector: Tensor, out: Tensor) -> Tensor:
    """``rows [n, P] @ vector [P]`` into ``out [n]``; a row's product rounds the same wherever the row is.

    BLAS runs the last rows of a matrix-vector product through other instructions than the rest (MKL,
    float32, AVX-512: the last ``n % 16``), so a point would round differently as the last row of a rank's
    block, of the pruning candidates or of all points. Here BLAS only ever gets multiples of 64 rows: the
    remaining rows go through a zero-padded block of 64 in the same layout (``rows`` must be in
    :func:`empty_for_gemv`'s).
    """
    body = len(rows) - len(rows) % _DOT_BLOCK_ROWS
    torch.mv(rows[:body], vector, out=out[:body])
    if body < len(rows):
        tail = empty_for_gemv(_DOT_BLOCK_ROWS, rows.shape[1], rows.dtype, rows.device).zero_()
        tail[: len(rows) - body] = rows[body:]
        out[body:] = torch.mv(tail, vector)[: len(rows) - body]
    return out
