"""Where a command runs: the one rule that turns a config's ``device`` value into a torch device."""

import torch

from anomaly.errors import ConfigError


def choose_device(name: str = "auto") -> torch.device:
    """``"auto"``: the GPU when one is visible, else the CPU; ``"cpu"``, ``"cuda"``, ``"cuda:<index>"`` as
    named. A name torch does not run our models on, or a GPU this machine lacks, is a ConfigError, before
    any model is loaded."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name) if isinstance(name, str) else None  # torch reads an int as a GPU
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto (cuda when present), cpu, cuda or cuda:<index>, got {name!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"device={name}: no CUDA GPU is visible here. Pass device=cpu, or device=auto to use a GPU "
                "only when there is one."
            )
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"device={name}: this machine has {count} CUDA GPU(s): cuda:0 to cuda:{count - 1}"
            )
    return device
