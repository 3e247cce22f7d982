"""Approximate greedy coreset subsampling of the memory bank (PatchCore Sec. 3.2, official sampler).

The greedy k-center loop runs once per selected point (tens of thousands of steps), so each step must
be cheap: a full step is one matrix-vector product plus a few in-place passes over N, into buffers
created once. Where the data allows, the triangle inequality lets steps skip most points
(``TrianglePruning``; the selection is the same; MVTec ``bottle``'s 214k patches: 65 → 43 s, while
the evenly spread magnetic tile patches gain nothing). Distances are kept squared (argmax and min do
not change under sqrt).

On several processes each rank holds its block of the points and the sampler gets the run's
:class:`~anomaly.distributed.Collective`: a step is a local argmax, then one all-reduce that tells every
rank the farthest point of all (:class:`_Shard`). The selection is that of one process, index for index,
because every number of a point comes out the same bits whichever block, rank or thread count computes it
(:mod:`~anomaly.methods.patchcore.reproducible`, and the mean it centres by, :func:`global_mean`).
``coreset_ratio`` 1 is :class:`KeepAll`, which selects nothing.
"""

import torch
from torch import Tensor
from tqdm import tqdm

from anomaly.distributed import LOCAL, Collective
from anomaly.errors import ConfigError
from anomaly.methods.patchcore.nearest_neighbors import build_index
from anomaly.methods.patchcore.reproducible import dot_rows, in_gemv_layout, project, projection_matrix
from anomaly.methods.patchcore.rows import PatchRows, as_rows, row_offset

_NORM_BLOCK_ROWS = 8192  # rows copied to float32 at a time by squared_norms: 4 MB at P = 128


def coreset_sampler(
    ratio: float,
    projection_dim: int = 128,
    num_starting_points: int = 10,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> "ApproximateGreedyCoreset | KeepAll":
    """The sampler that keeps ``ratio`` of the patches, ratio in (0, 1]: :class:`KeepAll` for 1."""
    if not 0 < ratio <= 1:
        raise ConfigError(f"coreset_ratio must be in (0, 1] (1 keeps every patch), got {ratio}")
    if ratio == 1:
        return KeepAll()
    return ApproximateGreedyCoreset(ratio, projection_dim, num_starting_points, dtype, seed)


class KeepAll:
    """The sampler of ``coreset_ratio`` 1: every patch, in order (nothing projected or selected)."""

    def select(self, features: Tensor | PatchRows, collective: Collective = LOCAL) -> Tensor:
        """``arange(N)`` over all ranks' rows, on every rank."""
        rows = as_rows(features)
        return torch.arange(row_offset(len(rows), collective)[1], device=rows.device)

    def extend(self, selected: Tensor, features: Tensor | PatchRows) -> Tensor:
        """Every new row, in order."""
        rows = as_rows(features)
        return torch.arange(len(rows), device=rows.device)


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
    """Selects ``int(N * ratio)`` patch features that cover the rest (greedy k-center), ratio in (0, 1).

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
        if not 0 < ratio < 1:
            raise ConfigError(f"coreset_ratio must be in (0, 1) for a greedy coreset (coreset_sampler gives "
                              f"KeepAll for 1), got {ratio}")  # fmt: skip
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
        """``int(N * ratio)``, at least 1."""
        return max(1, int(num_points * self.ratio))

    def select(self, features: Tensor | PatchRows, collective: Collective = LOCAL) -> Tensor:
        """Coreset indices ``[n]`` (int64, in selection order, on their device) of ``features [N, D]``.

        On several processes ``features`` is this rank's block (the blocks in rank order are all the
        features) and the indices count over all blocks. Every rank draws the same projection and starting
        points from ``Generator(seed)`` and returns the same indices: those one process selects from the
        blocks concatenated.
        """
        rows = as_rows(features)
        num_points = row_offset(len(rows), collective)[1]
        generator = torch.Generator().manual_seed(self.seed)
        points = random_projection(rows, self.projection_dim, generator, self.dtype, collective)
        starts = torch.randperm(num_points, generator=generator)[: self.num_starting_points]
        count = self.num_selected(num_points)
        return greedy_k_center(points, count, starts.to(rows.device), collective=collective)

    def extend(self, selected: Tensor, features: Tensor | PatchRows) -> Tensor:
        """Indices ``[n]`` into ``features [N, D]`` that extend the coreset ``selected [M, D]`` greedily:
        ``int(N * ratio)`` new points, each the one farthest from everything selected so far, starting
        from the current selection (the distance of a new point to the selection is at first its
        distance to its nearest ``selected`` row). In the same random projection as :meth:`select`, in one
        process (``anomaly-update`` runs in one)."""
        rows = as_rows(features)
        generator = torch.Generator().manual_seed(self.seed)  # the same projection matrix as select()
        mean = global_mean(rows)
        matrix = projection_matrix(len(mean), self.projection_dim, generator, rows.device)
        points = project(rows, matrix, mean, self.dtype)
        bank = project(selected, matrix, mean, torch.float32)
        nearest = build_index(bank, "torch").search(points.float(), 1)[0][:, 0]  # exact distances
        return greedy_k_center(points, self.num_selected(len(rows)), initial_sq_dist=nearest.square())


def random_projection(
    features: Tensor | PatchRows,
    dim: int,
    generator: torch.Generator,
    dtype: torch.dtype,
    collective: Collective = LOCAL,
) -> Tensor:
    """Centred, projected features ``[N, dim]`` in ``dtype``; ``[N, D]`` unprojected if D <= dim.

    On several processes, this rank's rows, centred by the mean of all ranks' (:func:`global_mean`).
    """
    rows = as_rows(features)
    mean = global_mean(rows, collective)
    matrix = projection_matrix(len(mean), dim, generator, rows.device)
    return project(rows, matrix, mean, dtype)


def global_mean(rows: PatchRows, collective: Collective = LOCAL) -> Tensor:
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
    dim = max(collective.gather_counts(len(local)))  # a rank without rows has D = 0
    total = torch.zeros(dim, dtype=torch.float64, device=rows.device)
    total[: len(local)] = local
    count = row_offset(len(rows), collective)[1]
    return (collective.sum(total) / count).float()


def greedy_k_center(
    points: Tensor,
    count: int,
    starts: Tensor | None = None,
    prune: bool | None = None,
    initial_sq_dist: Tensor | None = None,
    collective: Collective = LOCAL,
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

    On several processes (``collective``) ``points`` is this rank's block of all ranks' points (in rank
    order), and ``starts`` and the returned indices count over all of them; every rank returns the indices
    one process returns for the blocks concatenated. The pruning stays on for each block: it only decides
    whose distances a step computes, and a distance comes out the same bits either way (:func:`dot_rows`),
    so neither the pruning nor where the blocks split changes the selection.
    """
    points = in_gemv_layout(points)
    num_points = len(points)
    sq_norms = squared_norms(points)  # [N]
    shard = _Shard(points, sq_norms, collective)
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

    def __init__(self, points: Tensor, sq_norms: Tensor, collective: Collective) -> None:
        self.points, self.sq_norms, self.collective = points, sq_norms, collective
        self.offset = row_offset(len(points), collective)[0]
        self.board = torch.zeros(collective.size, 3 + points.shape[1], dtype=torch.float64,
                                 device=points.device)  # fmt: skip

    def rows(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """The points ``[S, P]`` and squared norms ``[S]`` at ``indices [S]`` (over all ranks), on every
        rank: each owner fills its rows into zeros, and the sum over ranks is every row exactly."""
        local = indices - self.offset
        mine = ((local >= 0) & (local < len(self.points))).nonzero().squeeze(1)
        rows = torch.zeros(len(indices), 1 + self.points.shape[1], dtype=torch.float64, device=indices.device)
        rows[mine, 0] = self.sq_norms[local[mine]].double()
        rows[mine, 1:] = self.points[local[mine]].double()
        rows = self.collective.sum(rows)
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
        post = self.board[self.collective.rank]  # distance, index, squared norm, coordinates
        if len(min_dist):
            post[0], post[1] = top[0], top[1] + self.offset
            post[2:3] = self.sq_norms.index_select(0, top[1].view(1))
            post[3:] = self.points.index_select(0, top[1].view(1))[0]
        else:
            post[0] = -torch.inf  # no point here: never the farthest
        self.board = self.collective.sum(self.board)
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
