"""Shared fixtures: a tiny random backbone with the FeatureExtractor interface."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from torch import Tensor, nn

from anomaly.metrics import Evaluator
from anomaly.train import CONFIG_DIR, train

IMAGE_SIZE = 64  # side of the synthetic test images below
SQUARE = (slice(20, 40), slice(24, 44))  # rows, columns of the pasted defect


def smooth_images(count: int, seed: int) -> Tensor:
    """``[count, 3, 64, 64]`` smooth noise in [0.3, 0.7]: the "normal" texture of the method tests."""
    coarse = torch.rand(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    smooth = F.interpolate(coarse, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return 0.3 + 0.4 * smooth


def with_square(images: Tensor) -> Tensor:
    """``images`` with a bright square pasted at ``SQUARE``: a defect the models never saw."""
    defective = images.clone()
    defective[:, :, SQUARE[0], SQUARE[1]] = 1.0
    return defective


class TinyBackbone(nn.Module):
    """Three frozen random conv stages at strides 4/8/16 (8/12/16 channels)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stage1 = nn.Sequential(nn.Conv2d(3, 8, 3, 4, 1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 12, 3, 2, 1), nn.ReLU())
        self.stage3 = nn.Sequential(nn.Conv2d(12, 16, 3, 2, 1), nn.ReLU())
        self.layers = ["stage1", "stage2", "stage3"]
        self.channels = [8, 12, 16]
        self.strides = [4, 8, 16]
        self.requires_grad_(False)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        f1 = self.stage1(images)
        f2 = self.stage2(f1)
        return {"stage1": f1, "stage2": f2, "stage3": self.stage3(f2)}


@pytest.fixture
def tiny_backbone() -> TinyBackbone:
    return TinyBackbone()


SMALL_DATA = [
    "dataset.n_train=16",
    "dataset.n_test_good=8",
    "dataset.n_test_defect=12",
    "dataset.generated_size=128",
    "dataset.image_size=128",
    "dataset.num_workers=0",
    "dataset.batch_size=8",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def run_training(tmp_path: Path, overrides: list[str]) -> tuple[dict, Path]:
    """Runs anomaly-train's job on small generated data (shared by the tests of one session); returns
    (metrics, run dir)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*SMALL_DATA, *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    output_dir = tmp_path / "run"
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.data_dir = str(tmp_path.parent / "shared-data")  # generated once per test session folder
        del cfg.hydra  # as in a real run, where the job config has no hydra node
    return train(cfg), output_dir


@torch.no_grad()
def score_test_set(model: nn.Module, data) -> dict[str, float]:
    """Metrics of ``model`` on the test split of ``data`` (a set-up data module), like the test loop."""
    evaluator = Evaluator()
    for batch in data.test_dataloader():
        out = model(batch["image"])
        evaluator.update(out.image_score, batch["label"], out.anomaly_map, batch["mask"])
    return evaluator.compute()
