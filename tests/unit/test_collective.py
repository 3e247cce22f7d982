"""The Collective that the collective steps take: its operations on two processes (gloo, spawned here) and
alone, the check that every rank holds the same model, and PaDiM's minimum of two images over all ranks."""

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from anomaly.distributed import LOCAL, Collective, ProcessGroupCollective
from anomaly.errors import DataError, DistributedStateError
from anomaly.methods.base import AnomalyOutput, FitOnceModel, register_fitted_buffer
from anomaly.methods.lightning import check_same_state, state_checksums, take_rank_zero_buffers
from anomaly.methods.padim.model import Padim


class MeanImage(FitOnceModel):
    """A toy fit-once method: the mean training image, over every rank's images (through the collective)."""

    def __init__(self) -> None:
        super().__init__()
        register_fitted_buffer(self, "mean")
        self._sum, self._count = torch.zeros(3, 8, 8, dtype=torch.float64), 0

    @property
    def is_fitted(self) -> bool:
        return self.mean.numel() > 0

    def collect(self, images: Tensor) -> None:
        self._sum += images.double().sum(dim=0)
        self._count += len(images)

    def fit(self, collective: Collective = LOCAL) -> None:
        count = collective.sum(torch.tensor([self._count]))
        self.mean = (collective.sum(self._sum.clone()) / count).float()

    def forward(self, images: Tensor) -> AnomalyOutput:
        anomaly_map = (images - self.mean).abs().mean(dim=1, keepdim=True)
        return AnomalyOutput(anomaly_map, anomaly_map.amax(dim=(1, 2, 3)))


class RankIgnoringMeanImage(MeanImage):
    """The same toy written without ranks in mind: each process fits its own images only."""

    def fit(self, collective: Collective = LOCAL) -> None:
        super().fit(LOCAL)


def images_of(rank: int) -> Tensor:
    """Rank ``rank``'s block of the toy's training images: 2 on rank 0, 3 on rank 1 (uneven)."""
    images = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return images[:2] if rank == 0 else images[2:]


def fitted(model: MeanImage, rank: int, collective: Collective) -> MeanImage:
    model.collect(images_of(rank))
    model.fit(collective)
    return model


def check_error(model: nn.Module, collective: Collective) -> str | None:
    """The message of :func:`check_same_state`'s error, None when every rank agrees."""
    try:
        check_same_state(model, collective, "fitting")
    except DistributedStateError as error:
        return str(error)
    return None


def run_rank(rank: int, init_file: str, out_dir: str, backbone: type) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    torch.set_num_threads(1)
    try:
        collective = ProcessGroupCollective()
        results = {
            "rank": collective.rank,
            "size": collective.size,
            "sum": collective.sum(torch.tensor([1.0, rank])),
            "max": collective.max(torch.tensor([rank, -rank])),
            "rows": collective.gather_rows(torch.full((rank + 1, 2), rank)),  # 1 row, then 2
            "counts": collective.gather_counts(rank + 1),
            "objects": collective.gather_objects([f"from {rank}"]),
            "combining": check_error(fitted(MeanImage(), rank, collective), collective),
            "combined_mean": fitted(MeanImage(), rank, collective).mean,
            "ignoring": check_error(fitted(RankIgnoringMeanImage(), rank, collective), collective),
        }
        norm = nn.BatchNorm1d(4).train()
        norm(torch.randn(6, 4, generator=torch.Generator().manual_seed(rank)))  # each rank's last step
        results["norm_before"] = check_error(norm, collective)
        take_rank_zero_buffers(norm, collective)
        results["norm_after"] = check_error(norm, collective)
        padim = Padim(backbone(layers=("stage1",)), n_features=4)
        padim.collect(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(rank)))
        padim.fit(collective)  # one image per rank, two over both
        results["padim_count"] = int(padim.count)
    finally:
        dist.destroy_process_group()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow
def test_two_processes_combine_and_a_rank_ignoring_method_is_caught(tmp_path: Path, tiny_backbone) -> None:
    mp.spawn(run_rank, args=(str(tmp_path / "init"), str(tmp_path), tiny_backbone), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for rank, results in enumerate(ranks):
        assert (results["rank"], results["size"]) == (rank, 2)
        assert results["sum"].tolist() == [2.0, 1.0] and results["max"].tolist() == [1, 0]
        assert results["rows"].tolist() == [[0, 0], [1, 1], [1, 1]] and results["counts"] == [1, 2]
        assert results["objects"] == ["from 0", "from 1"]
        assert results["combining"] is None  # the same model on every rank: the one of all 5 images
        all_images = torch.cat([images_of(0), images_of(1)])
        torch.testing.assert_close(results["combined_mean"], all_images.double().mean(dim=0).float())
        assert results["ignoring"] is not None and "mean differ from rank 0" in results["ignoring"]
        assert "RankIgnoringMeanImage" in results["ignoring"]
        assert "running_mean, running_var differ" in results["norm_before"]
        assert results["norm_after"] is None
        assert results["padim_count"] == 2


def test_the_local_collective_returns_its_input() -> None:
    tensor = torch.arange(6.0).reshape(3, 2)
    assert LOCAL.sum(tensor) is tensor and LOCAL.max(tensor) is tensor and LOCAL.gather_rows(tensor) is tensor
    assert (LOCAL.rank, LOCAL.size, LOCAL.gather_counts(4), LOCAL.gather_objects(["a"])) == (0, 1, [4], ["a"])
    check_same_state(RankIgnoringMeanImage(), LOCAL, "fitting")  # one process: nothing to compare


def test_state_checksums_tell_a_permutation_apart() -> None:
    model = nn.Linear(3, 2)
    names, before = state_checksums(model)
    with torch.no_grad():
        model.weight.copy_(model.weight.flip(1))
    assert names == ["weight", "bias"]
    assert before[0, 0] == pytest.approx(float(state_checksums(model)[1][0, 0]))  # the same sum
    assert not torch.equal(before[0], state_checksums(model)[1][0])


def test_padim_without_its_regulariser_refuses_too_few_images_for_a_covariance(tiny_backbone, smooth_images):
    """Once a raw ``torch._C._LinAlgError`` from the Cholesky factorisation of a singular covariance."""
    model = Padim(tiny_backbone(), n_features=10, covariance_epsilon=0.0)
    assert model.minimum_training_images()[0] == 11
    model.collect(smooth_images(10, seed=0))
    with pytest.raises(DataError, match=r"at least 11 training images .* got 10"):
        model.fit()
