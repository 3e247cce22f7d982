"""Loading backbone weights, with errors that say how to fix them on an offline machine.

Pretrained features are the whole point of a backbone here: random features give meaningless metrics.
So a missing file is an error that names the file, where to put it and how to override it, and random
init happens only when asked for (``weights=None``), with a warning.
"""

import os
import warnings
from collections.abc import Mapping
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import WeightsEnum

from anomaly.errors import BackboneWeightsError, ConfigError

StateDict = dict[str, Tensor]


def build_torchvision_model(name: str, weights: str | None, weights_path: str | None) -> nn.Module:
    """Torchvision model ``name`` with weights from ``weights_path``, else the ``weights`` enum member."""
    model = torchvision.models.get_model(name, weights=None)
    if weights_path is not None:
        load_strict(model, load_local_state_dict(weights_path), source=weights_path)
    elif weights is None:
        warn_random_init(name)
    else:
        enum_member = torchvision_weights(name, weights)
        load_strict(model, download_state_dict(enum_member), source=url_file_name(enum_member.url))
    return model


def torchvision_weights(name: str, weights: str) -> WeightsEnum:
    """Resolves an enum member name such as ``"IMAGENET1K_V1"`` for torchvision model ``name``."""
    enum = torchvision.models.get_model_weights(name)
    try:
        return enum[weights]
    except KeyError:
        valid = [member.name for member in enum]
        raise ConfigError(
            f"Unknown weights {weights!r} for backbone {name} (backbone.weights): use one of {valid}, null "
            "for random init, or a local file (backbone.weights_path=<.pth state dict>)."
        ) from None


def download_state_dict(weights: WeightsEnum) -> StateDict:
    """Loads from the torch hub cache, downloading (hash-checked) only if the file is not there."""
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as err:
        raise BackboneWeightsError(missing_weights_message(weights.url)) from err


def url_file_name(url: str) -> str:
    return os.path.basename(urlparse(url).path)


def missing_weights_message(url: str) -> str:
    """Tells the user exactly which file to fetch, where the hub cache expects it, and the override."""
    file_name = url_file_name(url)
    target = os.path.join(torch.hub.get_dir(), "checkpoints", file_name)
    return (
        f"could not load pretrained backbone weights {file_name}: the torch hub cache has no valid copy "
        f"and the download failed (is this machine offline?).\n"
        f"  Download it from {url}\n"
        f"  and place it at {target}\n"
        f"  or pass backbone.weights_path=/path/to/{file_name}"
    )


def load_local_state_dict(path: str) -> StateDict:
    """Reads a plain state dict (tensors only, ``weights_only=True``) from a local file."""
    if not os.path.isfile(path):
        what = "is a folder, not a weights file" if os.path.isdir(path) else "does not exist"
        raise BackboneWeightsError(
            f"Backbone weights file {path} {what}: pass backbone.weights_path=<the .pth state dict file>, or "
            "leave it null to use the backbone's standard weights."
        )
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise BackboneWeightsError(f"{path} is not a readable torch state dict: {err}") from err
    if not isinstance(state_dict, Mapping):
        raise BackboneWeightsError(f"{path} holds a {type(state_dict).__name__}, not a state dict")
    return dict(state_dict)


def load_strict(model: nn.Module, state_dict: StateDict, source: str, shown: int = 5) -> None:
    """``load_state_dict(strict=True)`` whose error names ``source`` and the first mismatching keys."""
    expected = model.state_dict().keys()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    if missing or unexpected:
        raise BackboneWeightsError(
            f"{source} does not fit {type(model).__name__}: {len(missing)} missing keys "
            f"(first: {missing[:shown]}), {len(unexpected)} unexpected keys (first: {unexpected[:shown]})"
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:  # same keys, other shapes
        raise BackboneWeightsError(f"{source} does not fit {type(model).__name__}: {err}") from err


def warn_random_init(name: str) -> None:
    warnings.warn(
        f"backbone {name} is randomly initialised (weights=None and no weights_path): "
        "its features are random and every metric computed with them is meaningless",
        UserWarning,
        stacklevel=4,
    )
