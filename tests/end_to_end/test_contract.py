"""A fifth method needs only its own model and config: a toy declared here, nowhere in anomaly/, is fitted,
calibrated, tested, saved and reloaded by anomaly-train through the public contract alone (its fit
combining every process's images through the collective it gets)."""

import pytest
import torch
from torch import Tensor

from anomaly.distributed import LOCAL, Collective
from anomaly.methods import METHODS
from anomaly.methods.base import AnomalyOutput, FitOnceModel, register_fitted_buffer
from anomaly.model_io import load_model

pytestmark = pytest.mark.slow  # commands and whole runs: seconds to a minute each


class MeanImage(FitOnceModel):
    """The mean normal image; a pixel's anomaly is its distance to it (a toy, not a method to use)."""

    def __init__(self, blur: int = 1) -> None:
        super().__init__()
        self.blur = blur
        register_fitted_buffer(self, "mean")
        self._sum: Tensor | None = None
        self._count = 0

    @property
    def is_fitted(self) -> bool:
        return self.mean.numel() > 0

    def collect(self, images: Tensor) -> None:
        self._sum = images.sum(0) if self._sum is None else self._sum + images.sum(0)
        self._count += len(images)

    def fit(self, collective: Collective = LOCAL) -> None:
        count = collective.sum(torch.tensor([self._count]))  # over every process's images
        self.mean = collective.sum(self._sum) / count
        self._sum = None

    def forward(self, images: Tensor) -> AnomalyOutput:
        distance = (images - self.mean).abs().mean(dim=1, keepdim=True)
        anomaly_map = torch.nn.functional.avg_pool2d(distance, self.blur, 1, self.blur // 2)
        return AnomalyOutput(anomaly_map, anomaly_map.amax(dim=(1, 2, 3)))


def test_a_method_declared_outside_the_package_runs_through_anomaly_train(
    tmp_path, run_training, monkeypatch
):
    monkeypatch.setitem(METHODS, "mean_image", MeanImage)  # its line in anomaly/methods/__init__.py
    method = {  # its configs/method/mean_image.yaml
        "name": "mean_image", "max_epochs": 1, "max_steps": -1, "log_every_n_steps": 1,
        "model": {"_target_": f"{MeanImage.__module__}.MeanImage", "blur": 3},
        "module": {"_target_": "anomaly.methods.lightning.FitOnceModule"},
    }  # fmt: skip
    metrics, run_dir = run_training(tmp_path, ["logger=none"], method)
    assert {"image_auroc", "pixel_auroc", "pixel_aupro", "threshold"} <= set(metrics)
    assert metrics["pixel_auroc"] > 0.6  # the pasted defects differ from the mean texture
    loaded = load_model(run_dir)
    assert isinstance(loaded.model, MeanImage) and loaded.model.blur == 3 and loaded.calibration is not None
    images = torch.rand(2, 3, 128, 128)
    assert loaded.model(images).anomaly_map.shape == (2, 1, 128, 128)
