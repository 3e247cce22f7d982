"""Approximate greedy coreset subsampling of the memory bank (PatchCore Sec. 3.2, official sampler).

The greedy k-center loop runs once per selected point (tens of thousands of steps), so each step must
be cheap: a full step is one matrix-vector product plus a few in-place passes over N, into buffers
created once. Where the data allows, the triangle inequality lets steps skip most points
(``TrianglePruning``; the selection is the same; MVTec ``bottle``'s 214k patches: 65 → 43 s, while
the evenly spread magnetic tile patches gain nothing). Distances are kept squared (argmax and min do
not change under sqrt).

On several processes (:mod:`anomaly.distributed`) each rank holds its block of the points, and a step is
a local argmax, then one all-reduce that tells every rank the farthest point of all (:class:`_Shard`).
The selection is that of one process, index for index, because every number of a point comes out the same
bits whichever block, rank or thread count computes it: the projection (:func:`project`), the mean it
centres by (:func:`global_mean`) and the distances (:func:`dot_rows`).
"""

import contextlib
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor
from tqdm import tqdm

from anomaly import distributed
from anomaly.errors import ConfigError
from anomaly.methods.patchcore.nearest_neighbors import build_index

PROJECTION_BLOCK_ROWS = 8192  # rows per projection product; every product has this shape (see project)
_DOT_BLOCK_ROWS = 64  # BLAS only ever gets multiples of this many rows in a matrix-vector product
_SUM_BLOCK_ROWS = 1024  # rows per float64 partial sum (column_sums)
_NORM_BLOCK_ROWS = 8192  # rows copied to float32 at a time by squared_norms: 4 MB at P = 128


class PatchRows(Protocol):
    """Patch features ``[N, D]`` read in blocks of rows: a tensor (:class:`TensorRows`) or PatchCore's spill
    file (:class:`~anomaly.methods.patchcore.spill.PatchSpill`). On several processes, this rank's block."""

    device: torch.device  # where the projected points are made

    def __len__(self) -> int: ...

    def feature_sum(self) -> Tensor:
        """Column sums ``[D]`` (float64); ``[0]`` when there are no rows."""
        ...

    def blocks(self, rows: int) -> Iterator[Tensor]:
        """The rows in order, ``[<= rows, D]`` at a time."""
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


def as_rows(features: Tensor | PatchRows) -> PatchRows:
    return TensorRows(features) if isinstance(features, Tensor) else features


def column_sums(rows: Tensor) -> Tensor:
    """Column sums ``[D]`` (float64) of ``rows [n, D]``, a block of rows at a time: ``sum(dtype=float64)``
    of them all would first copy them all to float64."""
    total = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)
    for block in rows.split(_SUM_BLOCK_ROWS):
        total += block.sum(dim=0, dtype=torch.float64)
    return total


def squared_norms(points: Tensor) -> Tensor:
    """``|x|²`` ``[N]`` of ``points [N, P]`` in their dtype, each summed in float32, a block of rows at a
    time: ``vector_norm(points, dtype=float32)`` of them all would first copy them all to float32 (at
    P = 128 in float16, 512 bytes per point next to the points' 256: the fit's peak grew by that)."""
    out = torch.empty(len(points), dtype=points.dtype, device=points.device)
    for start in range(0, len(points), _NORM_BLOCK_ROWS):
        block = points[start : start + _NORM_BLOCK_ROWS]
        norms = torch.linalg.vector_norm(block, dim=1, dtype=torch.float32)  # [<= 8192]
        out[start : start + len(block)] = norms.square_()
    return out


class ApproximateGreedyCoreset:
    """Selects ``int(N * ratio)`` patch features that cover the rest (greedy k-center).

    As the official ``ApproximateGreedyCoresetSampler``: features are randomly projected to
    ``projection_dim`` (Johnson-Lindenstrauss) and the first minimum distances are the mean distances to
    ``num_starting_points`` random points instead of the first selected point's. The projection is a
    seeded uniform matrix U(-1/sqrt(D), 1/sqrt(D)), the distribution of the official bias-free
    ``nn.Linear`` default init. ``dtype=torch.float16`` halves the loop's memory traffic.
    """

    def __init__(
        self,
        ratio: float,
        projection_dim: int = 128,
        num_starting_points: int = 10,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        if not 0 < ratio <= 1:
            raise ConfigError(f"coreset_ratio must be in (0, 1] (1 keeps every patch), got {ratio}")
        if projection_dim < 1 or num_starting_points < 1:
            raise ConfigError(f"projection_dim and num_starting_points must be >= 1, got {projection_dim}, "
                              f"{num_starting_points}")  # fmt: skip
        if dtype not in (torch.float32, torch.float16):
            raise ConfigError(f"coreset dtype must be float32 or float16, got {dtype}")
        self.ratio = ratio
        self.projection_dim = projection_dim
        self.num_starting_points = num_starting_points
        self.dtype = dtype
        self.seed = seed

    def num_selected(self, num_points: int) -> int:
        """``int(N * ratio)``, at least 1; a ratio of 1 keeps all N."""
        if self.ratio == 1:
            return num_points
        return max(1, int(num_points * self.ratio))

    def select(self, features: Tensor | PatchRows) -> Tensor:
        """Coreset indices ``[n]`` (int64, in selection order, on their device) of ``features [N, D]``.

        On several processes ``features`` is this rank's block (the blocks in rank order are all the
        features) and the indices count over all blocks. Every rank draws the same projection and starting
        points from ``Generator(seed)`` and returns the same indices: those one process selects from the
        blocks concatenated.
        """
        rows = as_rows(features)
        num_points = shard_extent(len(rows), rows.device)[1]
        if self.ratio == 1:
            return torch.arange(num_points, device=rows.device)
        generator = torch.Generator().manual_seed(self.seed)
        points = random_projection(rows, self.projection_dim, generator, self.dtype)
        starts = torch.randperm(num_points, generator=generator)[: self.num_starting_points]
        return greedy_k_center(points, self.num_selected(num_points), starts.to(rows.device))

    def extend(self, selected: Tensor, features: Tensor | PatchRows) -> Tensor:
        """Indices ``[n]`` into ``features [N, D]`` that extend the coreset ``selected [M, D]`` greedily:
        ``int(N * ratio)`` new points, each the one farthest from everything selected so far, starting
        from the current selection (the distance of a new point to the selection is at first its
        distance to its nearest ``selected`` row). In the same random projection as :meth:`select`, in one
        process (``anomaly-update`` runs in one)."""
        rows = as_rows(features)
        if self.ratio == 1:
            return torch.arange(len(rows), device=rows.device)
        generator = torch.Generator().manual_seed(self.seed)  # the same projection matrix as select()
        mean = global_mean(rows)
        matrix = projection_matrix(len(mean), self.projection_dim, generator, rows.device)
        points = project(rows, matrix, mean, self.dtype)
        bank = project(selected, matrix, mean, torch.float32)
        nearest = build_index(bank, "torch").search(points.float(), 1)[0][:, 0]  # exact distances
        return greedy_k_center(points, self.num_selected(len(rows)), initial_sq_dist=nearest.square())


def shard_extent(num_rows: int, device: torch.device) -> tuple[int, int]:
    """(the index of this rank's first row among all ranks' rows, the number of those); one process:
    ``(0, num_rows)``."""
    counts = distributed.all_gather_counts(num_rows, device)
    return sum(counts[: distributed.rank()]), sum(counts)


def random_projection(
    features: Tensor | PatchRows, dim: int, generator: torch.Generator, dtype: torch.dtype
) -> Tensor:
    """Centred, projected features ``[N, dim]`` in ``dtype``; ``[N, D]`` unprojected if D <= dim.

    On several processes, this rank's rows, centred by the mean of all ranks' (:func:`global_mean`).
    """
    rows = as_rows(features)
    mean = global_mean(rows)
    matrix = projection_matrix(len(mean), dim, generator, rows.device)
    return project(rows, matrix, mean, dtype)


def global_mean(rows: PatchRows) -> Tensor:
    """The mean ``[D]`` (float32, on the rows' device) of every rank's rows, from float64 sums.

    Centring changes no distance but shrinks the norms, so that ``|x|² + |c|² - 2x·c`` loses fewer bits
    to cancellation (matters in float16). It changes the rounding, though, and the rounding decides float16
    ties, so the centre must be the same bits however the rows were batched or split between processes:
    float64 sums, added over ranks and rounded once to float32, differ between summation orders only by
    float64 rounding (2^29 times finer than float32's), so the rounded mean is the same unless the exact
    one lies that close to a float32 rounding boundary. A spill keeps its sums while it collects, so the
    mean costs no pass over the file; projecting while collecting would need the centre before the last
    batch, and a provisional one (the first batch's mean) would round differently on each rank.
    """
    local = rows.feature_sum().to(rows.device)
    dim = max(distributed.all_gather_counts(len(local), rows.device))  # a rank without rows has D = 0
    total = torch.zeros(dim, dtype=torch.float64, device=rows.device)
    total[: len(local)] = local
    count = shard_extent(len(rows), rows.device)[1]
    return (distributed.all_reduce_sum(total) / count).float()


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
    """Runs the block on one intra-op CPU thread (see :func:`project`), then restores the thread count."""
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


def greedy_k_center(
    points: Tensor,
    count: int,
    starts: Tensor | None = None,
    prune: bool | None = None,
    initial_sq_dist: Tensor | None = None,
) -> Tensor:
    """Greedy k-center on ``points [N, P]``: ``count`` indices (int64, in selection order).

    Each step picks the point farthest from everything selected so far (the first of equals); the initial
    "distance to the selection" of every point is its mean distance to the ``starts [S]`` (not selected
    themselves), or ``initial_sq_dist [N]`` (squared) to extend an existing selection.
    With ``prune`` (default: on the CPU), points that the triangle inequality proves cannot get closer
    to the new centre are skipped (:class:`TrianglePruning`); a step that cannot skip most points is one
    full pass, as before. On a GPU the pruning is off: each probe makes the host wait for a count, while
    a full step is one memory-bound pass there, and without any host synchronisation the loop queues its
    steps ahead of the GPU.

    On several processes ``points`` is this rank's block of all ranks' points (in rank order), and
    ``starts`` and the returned indices count over all of them; every rank returns the indices one process
    returns for the blocks concatenated. The pruning stays on for each block: it only decides whose
    distances a step computes, and a distance comes out the same bits either way (:func:`dot_rows`), so
    neither the pruning nor where the blocks split changes the selection.
    """
    points = in_gemv_layout(points)
    num_points = len(points)
    sq_norms = squared_norms(points)  # [N]
    shard = _Shard(points, sq_norms)
    min_dist = torch.zeros(num_points, dtype=points.dtype, device=points.device)  # [N], squared
    work = torch.empty_like(min_dist)  # [N]
    center = points.new_empty(1, points.shape[1])  # [1, P], the newest centre
    center_sq = sq_norms.new_empty(1)  # [1]
    top = (min_dist.new_empty(()), torch.empty((), dtype=torch.long, device=points.device))

    def sq_distances_to(point: Tensor, point_sq: Tensor) -> Tensor:
        """Writes the squared distances of all points to ``point [P]`` (squared norm ``point_sq``) into
        ``work`` ([N])."""
        # addmv would fuse the next two passes, but it is 20x slower than mv in float16 on the CPU
        dot_rows(points, point, out=work)
        return work.mul_(-2).add_(sq_norms).add_(point_sq).clamp_(min=0)

    def sq_distances_of(candidates: Tensor) -> Tensor:
        """Squared distances ``[C]`` of ``points[candidates]`` to the newest centre, the same arithmetic."""
        rows = in_gemv_layout(points.index_select(0, candidates))
        distances = dot_rows(rows, center[0], out=work.new_empty(len(candidates))).mul_(-2)
        return distances.add_(sq_norms[candidates]).add_(center_sq).clamp_(min=0)

    if initial_sq_dist is not None:
        min_dist.copy_(initial_sq_dist)
    else:
        start_points, start_sq = shard.rows(starts)
        for point, point_sq in zip(start_points, start_sq, strict=True):
            min_dist.add_(sq_distances_to(point, point_sq).sqrt_())
        min_dist.div_(len(starts)).square_()

    selected = torch.empty(count, dtype=torch.long, device=points.device)
    prune = points.device.type == "cpu" if prune is None else prune
    pruning = TrianglePruning(points, count) if prune else None
    next_probe = 0 if prune else count  # without pruning no step ever probes
    probe_wait = TrianglePruning.FIRST_WAIT  # when pruning does not pay, it is tried less often
    for step in tqdm(range(count), desc="Coreset", leave=False, mininterval=1.0):
        selected[step] = shard.farthest(min_dist, top, center, center_sq)
        if pruning is not None:
            pruning.add_center(center[0], center_sq[0])
        candidates = pruning.candidates() if step >= next_probe else None
        if candidates is None:
            distances = sq_distances_to(center[0], center_sq)
            torch.minimum(min_dist, distances, out=min_dist)
            if step >= next_probe:  # a failed probe: refresh every point's centre and reach, wait longer
                pruning.update(None, distances, min_dist)
                next_probe, probe_wait = step + probe_wait, min(2 * probe_wait, TrianglePruning.MAX_WAIT)
        else:
            probe_wait = TrianglePruning.FIRST_WAIT
            distances = sq_distances_of(candidates)
            closer_min = torch.minimum(min_dist[candidates], distances)
            min_dist[candidates] = closer_min
            pruning.update(candidates, distances, closer_min)
    return selected


class _Shard:
    """Where this rank's ``points [n, P]`` lie among all ranks' points, and how a greedy step learns the
    farthest point of all.

    One process: its own argmax. Several: every rank posts its farthest point (distance, index among all
    points, squared norm, coordinates) in its row of a zeroed board, one all-reduce (sum) hands every rank
    every row exactly (a value plus zeros), and each takes the row with the largest distance, the first
    of equals. The rows are in rank order, and each rank posts its first maximum, so that is the lowest
    index among equals: what ``torch.max`` picks over all points in one process.
    """

    def __init__(self, points: Tensor, sq_norms: Tensor) -> None:
        self.points, self.sq_norms = points, sq_norms
        self.offset = shard_extent(len(points), points.device)[0]
        self.board = torch.zeros(distributed.world_size(), 3 + points.shape[1], dtype=torch.float64,
                                 device=points.device)  # fmt: skip

    def rows(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """The points ``[S, P]`` and squared norms ``[S]`` at ``indices [S]`` (over all ranks), on every
        rank: each owner fills its rows into zeros, and the sum over ranks is every row exactly."""
        local = indices - self.offset
        mine = ((local >= 0) & (local < len(self.points))).nonzero().squeeze(1)
        rows = torch.zeros(len(indices), 1 + self.points.shape[1], dtype=torch.float64, device=indices.device)
        rows[mine, 0] = self.sq_norms[local[mine]].double()
        rows[mine, 1:] = self.points[local[mine]].double()
        distributed.all_reduce_sum(rows)
        return rows[:, 1:].to(self.points.dtype), rows[:, 0].to(self.points.dtype)

    def farthest(
        self, min_dist: Tensor, top: tuple[Tensor, Tensor], center: Tensor, center_sq: Tensor
    ) -> Tensor:
        """The index ``[]`` (over all ranks) of the point with the largest ``min_dist``, the first of equals;
        its coordinates are written into ``center [1, P]`` and its squared norm into ``center_sq [1]``.
        ``top``: (value, index) buffers for the local maximum. No host synchronisation."""
        if len(min_dist):
            torch.max(min_dist, dim=0, out=top)  # first maximum, as argmax; faster than argmax in fp16 on CPU
        if len(self.board) == 1:
            torch.index_select(self.points, 0, top[1].view(1), out=center)
            torch.index_select(self.sq_norms, 0, top[1].view(1), out=center_sq)
            return top[1]
        self.board.zero_()
        post = self.board[distributed.rank()]  # distance, index, squared norm, coordinates
        if len(min_dist):
            post[0], post[1] = top[0], top[1] + self.offset
            post[2:3] = self.sq_norms.index_select(0, top[1].view(1))
            post[3:] = self.points.index_select(0, top[1].view(1))[0]
        else:
            post[0] = -torch.inf  # no point here: never the farthest
        distributed.all_reduce_sum(self.board)
        winner = self.board.index_select(0, self.board[:, 0].argmax().view(1))[0]  # argmax: the first
        center[0] = winner[3:]
        center_sq[0] = winner[2]
        return winner[1].long()


class TrianglePruning:
    """Which points a new centre c can still bring closer: the rest are skipped in that greedy step.

    Every point x keeps some selected centre a and its distance ``|x - a|``. Since
    ``|x - c| >= |a - c| - |x - a|``, c cannot lower x's distance r to the selection when
    ``|a - c| >= |x - a| + r`` (its ``reach``). When r is small next to the distances between centres,
    most points are skipped: a step then reads a few bytes per point instead of a ``P``-dim row. The test
    keeps a 1 % margin, so that rounding (float16 distances) never skips a point it should not.
    """

    MARGIN = 1.01
    FULL_PASS_FRACTION = 0.25  # more candidates than this: one full pass is cheaper than gathering them
    FIRST_WAIT, MAX_WAIT = 8, 64  # steps of plain full passes after a probe that found too many

    def __init__(self, points: Tensor, count: int) -> None:
        num_points = len(points)
        self.centers = points.new_empty(count, points.shape[1])  # [count, P] selected points, in order
        self.centers_sq = torch.empty(count, device=points.device)  # [count] float32
        self.num_centers = 0
        # [N] each point's centre a (an index into centers)
        self.owner = torch.zeros(num_points, dtype=torch.int32, device=points.device)
        self.owner_dist = torch.full((num_points,), float("inf"), device=points.device)  # [N] |x - a|
        self.reach = torch.full((num_points,), float("inf"), device=points.device)  # [N] |x - a| + r

    def add_center(self, center: Tensor, center_sq: Tensor) -> None:
        """Registers ``center [P]`` (squared norm ``center_sq []``) as the next centre."""
        self.centers[self.num_centers] = center
        self.centers_sq[self.num_centers] = center_sq.float()
        self.num_centers += 1

    def candidates(self) -> Tensor | None:
        """Indices of the points that the newest centre may bring closer, or None when that is so many
        that one full pass is cheaper (always at the first centre, which every point needs).

        Points whose centre is stale (a full pass without bookkeeping lowered their distance) keep a
        reach that is too large: the test stays valid, it only skips fewer points.
        """
        step = self.num_centers - 1
        if step == 0:
            return None
        dot = self.centers[:step].mv(self.centers[step]).float()
        center_dist = (self.centers_sq[:step] + self.centers_sq[step] - 2 * dot).clamp_(min=0).sqrt_()
        mask = center_dist[self.owner] < self.reach * self.MARGIN
        if int(mask.sum()) > self.FULL_PASS_FRACTION * len(mask):
            return None
        return mask.nonzero().squeeze(1)

    def update(self, indices: Tensor | None, sq_distances: Tensor, min_dist: Tensor) -> None:
        """Records the new centre's squared distances to ``points[indices]`` (all points if None) and
        those points' new squared distances ``min_dist`` to the selection."""
        rows = slice(None) if indices is None else indices
        distances = sq_distances.float().sqrt()
        owner_dist = self.owner_dist[rows]
        closer = distances < owner_dist
        self.owner[rows] = torch.where(closer, self.num_centers - 1, self.owner[rows])
        self.owner_dist[rows] = torch.where(closer, distances, owner_dist)
        self.reach[rows] = self.owner_dist[rows] + min_dist.float().sqrt()
