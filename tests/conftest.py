"""Shared fixtures: a tiny random backbone with the FeatureExtractor interface."""

import pytest
import torch
from torch import Tensor, nn


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
