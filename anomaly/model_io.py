"""Fitted-model files: safetensors tensors + the config that rebuilds the model. No pickle anywhere.

The frozen backbone's weights are not stored (they come from the backbone config, as at training
time); everything fitted or trained is. Loading checks the file format version.
"""

import json
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

FORMAT_VERSION = 1
BACKBONE_PREFIX = "backbone."


def save_model(model: nn.Module, cfg: DictConfig, path: Path) -> None:
    """Writes the fitted state of ``model`` and the (resolved) method config that built it."""
    state = {
        k: v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
        if not k.startswith(BACKBONE_PREFIX)
    }
    config = {"method": OmegaConf.to_container(cfg.method, resolve=True)}
    metadata = {"format_version": str(FORMAT_VERSION), "config": json.dumps(config)}
    save_file(state, str(path), metadata=metadata)


def load_model(path: str | Path, device: str = "cpu") -> tuple[nn.Module, DictConfig]:
    """Rebuilds the model saved by :func:`save_model`; returns it in eval mode with its config."""
    path = Path(path)
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
    return model.to(device).eval(), config
