"""Approximate greedy coreset subsampling of the memory bank (PatchCore Sec. 3.2, official sampler).

The greedy k-center loop runs once per selected point (tens of thousands of steps), so each step must
be cheap: a full step is one matrix-vector product plus a few in-place passes over N, into buffers
created once. Where the data allows, the triangle inequality lets steps skip most points
(``TrianglePruning``; the selection is the same; MVTec ``bottle``'s 214k patches: 65 → 43 s, while
the evenly spread magnetic tile patches gain nothing). Distances are kept squared (argmax and min do
not change under sqrt).
"""

import torch
from torch import Tensor
from tqdm import tqdm

from anomaly.errors import ConfigError
from anomaly.methods.patchcore.nearest_neighbors import build_index

_PROJECTION_CHUNK_ROWS = 65536


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

    def select(self, features: Tensor) -> Tensor:
        """Coreset indices ``[n]`` of ``features [N, D]`` (int64, in selection order, same device)."""
        num_points = len(features)
        if self.ratio == 1:
            return torch.arange(num_points, device=features.device)
        generator = torch.Generator().manual_seed(self.seed)
        points = random_projection(features, self.projection_dim, generator, self.dtype)
        starts = torch.randperm(num_points, generator=generator)[: self.num_starting_points]
        return greedy_k_center(points, self.num_selected(num_points), starts.to(features.device))

    def extend(self, selected: Tensor, features: Tensor) -> Tensor:
        """Indices ``[n]`` into ``features [N, D]`` that extend the coreset ``selected [M, D]`` greedily:
        ``int(N * ratio)`` new points, each the one farthest from everything selected so far, starting
        from the current selection (the distance of a new point to the selection is at first its
        distance to its nearest ``selected`` row). In the same random projection as :meth:`select`."""
        if self.ratio == 1:
            return torch.arange(len(features), device=features.device)
        generator = torch.Generator().manual_seed(self.seed)  # the same projection matrix as select()
        mean = features.mean(dim=0, dtype=torch.float32)
        matrix = projection_matrix(features.shape[1], self.projection_dim, generator, features.device)
        points = project(features, matrix, mean, self.dtype)
        bank = project(selected, matrix, mean, torch.float32)
        nearest = build_index(bank, "torch").search(points.float(), 1)[0][:, 0]  # exact distances
        return greedy_k_center(points, self.num_selected(len(features)), initial_sq_dist=nearest.square())


def random_projection(features: Tensor, dim: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
    """Centred, projected features ``[N, dim]`` in ``dtype``; ``[N, D]`` unprojected if D <= dim.

    Centring changes no distance but shrinks the norms, so that ``|x|² + |c|² - 2x·c`` loses fewer bits
    to cancellation (matters in float16).
    """
    mean = features.mean(dim=0, dtype=torch.float32)
    matrix = projection_matrix(features.shape[1], dim, generator, features.device)
    return project(features, matrix, mean, dtype)


def projection_matrix(
    in_dim: int, dim: int, generator: torch.Generator, device: torch.device
) -> Tensor | None:
    """The seeded ``[in_dim, dim]`` projection, U(-1/sqrt(D), 1/sqrt(D)); None when D <= dim."""
    if in_dim <= dim:
        return None
    bound = in_dim**-0.5
    return ((torch.rand(in_dim, dim, generator=generator) * 2 - 1) * bound).to(device)


def project(features: Tensor, matrix: Tensor | None, mean: Tensor, dtype: torch.dtype) -> Tensor:
    """``(features - mean) @ matrix`` in ``dtype``, in row chunks to bound the float32 temporaries."""
    cols = features.shape[1] if matrix is None else matrix.shape[1]
    out = empty_for_gemv(len(features), cols, dtype, features.device)
    for start in range(0, len(features), _PROJECTION_CHUNK_ROWS):
        chunk = features[start : start + _PROJECTION_CHUNK_ROWS].float() - mean
        out[start : start + len(chunk)] = chunk @ matrix if matrix is not None else chunk
    return out


def empty_for_gemv(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised ``[rows, cols]`` matrix stored in the layout where ``torch.mv`` on it is fastest.

    Measured on 2 CPU cores, N=214k, P=128: float32 4.6 ms column-major vs 16 ms row-major (MKL);
    float16 2.8 ms row-major vs 12 ms column-major (torch's own fp16 kernel).
    """
    if dtype == torch.float16:
        return torch.empty(rows, cols, dtype=dtype, device=device)
    return torch.empty(cols, rows, dtype=dtype, device=device).t()


def greedy_k_center(
    points: Tensor,
    count: int,
    starts: Tensor | None = None,
    prune: bool | None = None,
    initial_sq_dist: Tensor | None = None,
) -> Tensor:
    """Greedy k-center on ``points [N, P]``: ``count`` indices (int64, in selection order).

    Each step picks the point farthest from everything selected so far; the initial "distance to the
    selection" of every point is its mean distance to the ``starts [S]`` (not selected themselves), or
    ``initial_sq_dist [N]`` (squared) to extend an existing selection.
    With ``prune`` (default: on the CPU), points that the triangle inequality proves cannot get closer
    to the new centre are skipped (:class:`TrianglePruning`); a step that cannot skip most points is one
    full pass, as before. On a GPU the pruning is off: each probe makes the host wait for a count, while
    a full step is one memory-bound pass there, and without any host synchronisation the loop queues its
    steps ahead of the GPU. Full passes and pruned steps select the same points.
    """
    num_points = len(points)
    sq_norms = torch.linalg.vector_norm(points, dim=1, dtype=torch.float32).square_().to(points.dtype)  # [N]
    min_dist = torch.zeros(num_points, dtype=points.dtype, device=points.device)  # [N], squared
    work = torch.empty_like(min_dist)  # [N]
    center = points.new_empty(1, points.shape[1])  # [1, P]
    center_sq = sq_norms.new_empty(1)  # [1]
    top = (min_dist.new_empty(()), torch.empty((), dtype=torch.long, device=points.device))

    def sq_distances_to(index: Tensor) -> Tensor:
        """Writes the squared distances of all points to ``points[index]`` into ``work`` ([N])."""
        torch.index_select(points, 0, index.view(1), out=center)
        torch.index_select(sq_norms, 0, index.view(1), out=center_sq)
        # addmv would fuse the next two passes, but it is 20x slower than mv in float16 on the CPU
        torch.mv(points, center[0], out=work)
        return work.mul_(-2).add_(sq_norms).add_(center_sq).clamp_(min=0)

    def sq_distances_of(candidates: Tensor, index: Tensor) -> Tensor:
        """Squared distances ``[C]`` of ``points[candidates]`` to ``points[index]``, the same arithmetic."""
        distances = points[candidates].mv(points[index]).mul_(-2)
        return distances.add_(sq_norms[candidates]).add_(sq_norms[index]).clamp_(min=0)

    if initial_sq_dist is not None:
        min_dist.copy_(initial_sq_dist)
    else:
        for start in starts:
            min_dist.add_(sq_distances_to(start).sqrt_())
        min_dist.div_(len(starts)).square_()

    selected = torch.empty(count, dtype=torch.long, device=points.device)
    prune = points.device.type == "cpu" if prune is None else prune
    pruning = TrianglePruning(points, sq_norms, count) if prune else None
    next_probe = 0 if prune else count  # without pruning no step ever probes
    probe_wait = TrianglePruning.FIRST_WAIT  # when pruning does not pay, it is tried less often
    for step in tqdm(range(count), desc="Coreset", leave=False, mininterval=1.0):
        torch.max(min_dist, dim=0, out=top)  # first maximum, as argmax; faster than argmax in fp16 on CPU
        selected[step] = top[1]
        if pruning is not None:
            pruning.add_center(top[1])
        candidates = pruning.candidates() if step >= next_probe else None
        if candidates is None:
            distances = sq_distances_to(top[1])
            torch.minimum(min_dist, distances, out=min_dist)
            if step >= next_probe:  # a failed probe: refresh every point's centre and reach, wait longer
                pruning.update(None, distances, min_dist)
                next_probe, probe_wait = step + probe_wait, min(2 * probe_wait, TrianglePruning.MAX_WAIT)
        else:
            probe_wait = TrianglePruning.FIRST_WAIT
            distances = sq_distances_of(candidates, top[1])
            closer_min = torch.minimum(min_dist[candidates], distances)
            min_dist[candidates] = closer_min
            pruning.update(candidates, distances, closer_min)
    return selected


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

    def __init__(self, points: Tensor, sq_norms: Tensor, count: int) -> None:
        self.points, self.sq_norms = points, sq_norms
        num_points = len(points)
        self.centers = points.new_empty(count, points.shape[1])  # [count, P] selected points, in order
        self.centers_sq = torch.empty(count, device=points.device)  # [count] float32
        self.num_centers = 0
        # [N] each point's centre a (an index into centers)
        self.owner = torch.zeros(num_points, dtype=torch.int32, device=points.device)
        self.owner_dist = torch.full((num_points,), float("inf"), device=points.device)  # [N] |x - a|
        self.reach = torch.full((num_points,), float("inf"), device=points.device)  # [N] |x - a| + r

    def add_center(self, index: Tensor) -> None:
        """Registers ``points[index]`` as the next centre."""
        self.centers[self.num_centers] = self.points[index]
        self.centers_sq[self.num_centers] = self.sq_norms[index].float()
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
