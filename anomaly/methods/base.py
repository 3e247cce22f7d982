"""The contract every method implements.

A method is a pure torch ``nn.Module`` (no Lightning, Hydra or file I/O) that maps a batch of
normalised images ``[B, 3, H, W]`` to an :class:`AnomalyOutput`. How it learns differs:

* fit-once methods (PaDiM, PatchCore) implement :class:`FitOnceModel`: ``collect(images)`` is called
  for every training batch, then ``fit()`` once; no gradient is ever taken.
* trained methods (SimpleNet, EfficientAD) implement ``training_loss(images)`` and are optimised
  by a Lightning module.

Fitted state lives in buffers, so ``state_dict()`` is the whole model file. Buffers whose shape is
only known after fitting are registered empty with :func:`register_fitted_buffer`; loading a state
dict then resizes them instead of failing on the shape mismatch.
"""

from typing import NamedTuple

import torch
from torch import Tensor, nn


class AnomalyOutput(NamedTuple):
    """What every method returns in eval mode (a NamedTuple so that export sees plain tensors)."""

    anomaly_map: Tensor  # [B, 1, H, W] at the input image size, higher = more anomalous
    image_score: Tensor  # [B]


def register_fitted_buffer(module: nn.Module, name: str) -> None:
    """Registers an empty buffer that ``fit()`` fills and ``load_state_dict`` resizes."""
    module.register_buffer(name, torch.empty(0))
    if not getattr(module, "_resizes_fitted_buffers", False):
        module._register_load_state_dict_pre_hook(_resize_fitted_buffers, with_module=True)
        module._resizes_fitted_buffers = True


def _resize_fitted_buffers(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    for name, buffer in module.named_buffers(recurse=False):
        saved = state_dict.get(prefix + name)
        if saved is not None and saved.shape != buffer.shape:
            module._buffers[name] = torch.empty_like(saved, device=buffer.device)


class FitOnceModel(nn.Module):
    """Base for methods fitted in one pass over normal images (no optimiser)."""

    def collect(self, images: Tensor) -> None:
        """Extracts what ``fit`` needs from one training batch ``[B, 3, H, W]``."""
        raise NotImplementedError

    def fit(self) -> None:
        """Turns everything collected into the fitted state (buffers); frees the collection."""
        raise NotImplementedError

    @property
    def is_fitted(self) -> bool:
        raise NotImplementedError

    def forward(self, images: Tensor) -> AnomalyOutput:
        raise NotImplementedError
