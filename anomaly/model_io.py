"""Fitted-model files: safetensors tensors + the config that rebuilds the model. No pickle anywhere.

The frozen backbone's weights are not stored (they come from the backbone config, as at training
time); everything fitted or trained is. Loading checks the file format version.
"""

import json
from pathlib import Path
from typing import NamedTuple

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from anomaly.calibration import Calibration

FORMAT_VERSION = 1
BACKBONE_PREFIX = "backbone."


class LoadedModel(NamedTuple):
    model: nn.Module  # eval mode; images [B,3,H,W] in [0,1] at the training size → AnomalyOutput
    config: DictConfig  # the resolved method config (and the data transform settings) it was built from
    calibration: Calibration | None  # threshold fitted on normal validation images; None without val split


def save_model(model: nn.Module, cfg: DictConfig, path: Path, calibration: Calibration | None = None) -> None:
    """Writes the fitted state of ``model``, the resolved method config and transform, and the calibration."""
    state = {
        k: v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
        if not k.startswith(BACKBONE_PREFIX)
    }
    config = {
        "method": OmegaConf.to_container(cfg.method, resolve=True),
        "transform": {"image_size": cfg.dataset.image_size, "crop_size": cfg.dataset.crop_size},
    }
    metadata = {
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(OmegaConf.to_container(OmegaConf.create(config), resolve=True)),
        "calibration": json.dumps(calibration.to_dict() if calibration else None),
    }
    save_file(state, str(path), metadata=metadata)


def load_model(path: str | Path, device: str = "cpu") -> LoadedModel:
    """Rebuilds the model saved by :func:`save_model` (a run dir works too), with config and calibration."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"Model file {path} does not exist (a run writes <run dir>/model.safetensors)."
        )
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    version = int(metadata.get("format_version", -1))
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has model format version {version}; this anomaly version reads version "
            f"{FORMAT_VERSION}. Re-export the model with the matching anomaly version."
        )
    config = OmegaConf.create(json.loads(metadata["config"]))
    model = instantiate(config.method.model)
    state = load_file(str(path), device="cpu")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(BACKBONE_PREFIX)]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path} does not match its config: missing {missing}, unexpected {result.unexpected_keys}"
        )
    calibration = json.loads(metadata.get("calibration") or "null")
    return LoadedModel(model.to(device).eval(), config, Calibration(**calibration) if calibration else None)
