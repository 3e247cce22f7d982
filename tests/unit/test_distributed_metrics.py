"""The Evaluator on two processes (torch.distributed, gloo, spawned here): each rank updates with its
contiguous block of the test set, and compute() returns the same metrics on both ranks as one process
does, on the exact path and the binned one, for even and uneven splits and a rank without images, and the
per-sample metrics of parts whose views lie on both ranks."""

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_streaming_metrics import defect_maps

from anomaly.data.datamodule import block_range
from anomaly.distributed import LOCAL, ProcessGroupCollective
from anomaly.metrics import Evaluator

NUM_IMAGES = 9
SEED = 11
THRESHOLDS = {"threshold": 0.9, "pixel_threshold": 0.7}
PARTS = torch.tensor([0, 1, 1, 2, 3, 3, 4, 4, 5])  # part 3 (images 4, 5) spans the ranks' blocks of 5 + 4
# (images per rank: None = the data module's blocks, 5 + 4; the Evaluator's settings)
CASES = [
    (None, {}),
    (None, {"exact_pixel_limit": 0}),
    ([8, 1], {}),
    ([8, 1], {"exact_pixel_limit": 0}),
    ([8, 1], {"exact_pixel_limit": 6 * 32 * 32}),  # passed on rank 0 alone: rank 1 bins at compute()
    ([9, 0], {}),
    ([9, 0], {"exact_pixel_limit": 0}),
    ([3, 6], {"compute_pixel_metrics": False}),
    (None, {"part_ids": PARTS}),
    ([8, 1], {"compute_pixel_metrics": False, "part_ids": PARTS}),
]
# binned AUPRO sums float64 weights, whose order depends on the split; every other value is exact
FLOAT_SUMS = {"pixel_aupro", "pixel_aupro_max_error", "region_overlap_at_threshold"}


def rows_of(split: list[int] | None, rank: int) -> range:
    if split is None:
        return block_range(NUM_IMAGES, 2, rank)
    return range(sum(split[:rank]), sum(split[: rank + 1]))


def scaled_data() -> tuple[torch.Tensor, ...]:
    """Scores, labels, maps and masks; each map on a scale of its own, so that the ranks' blocks have
    different ranges and, binned, start from different grids."""
    scores, labels, maps, masks = defect_maps(SEED, NUM_IMAGES)
    return scores, labels, maps * torch.linspace(1, 8, NUM_IMAGES)[:, None, None, None], masks


def evaluate(rows: range, settings: dict, batch_size: int, collective=LOCAL) -> dict[str, float]:
    data = scaled_data()
    evaluator = Evaluator(**settings)
    for start in range(rows.start, rows.stop, batch_size):
        batch = torch.arange(start, min(start + batch_size, rows.stop))
        evaluator.update(*(tensor[batch] for tensor in data), indices=batch)
    return evaluator.compute(**THRESHOLDS, collective=collective)


def run_rank(rank: int, init_file: str, out_dir: str) -> None:
    timeout = datetime.timedelta(seconds=60)  # a rank that fails leaves the other waiting: not for long
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timeout
    )
    torch.set_num_threads(1)
    try:
        collective = ProcessGroupCollective()
        results = [evaluate(rows_of(split, rank), settings, 2, collective) for split, settings in CASES]
    finally:
        dist.destroy_process_group()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_processes_compute_the_metrics_of_one(tmp_path: Path) -> None:
    mp.spawn(run_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert ranks[0] == ranks[1]  # identical on every rank
    for (split, settings), two in zip(CASES, ranks[0], strict=True):
        one = evaluate(range(NUM_IMAGES), settings, batch_size=3)
        assert two.keys() == one.keys(), (split, settings)
        binned = "pixel_auroc_max_error" in one
        for key, value in one.items():
            expected = pytest.approx(value, abs=1e-12) if binned and key in FLOAT_SUMS else value
            assert two[key] == expected, (split, settings, key)
