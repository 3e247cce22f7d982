"""Where each cell of a feature grid sits in the image, so that maps and layers line up at every size.

Cell ``i`` of a convolutional feature map is centred on image pixel ``offset + stride·i`` (pixel indices).
``offset`` is not the ``(stride - 1)/2`` that ``F.interpolate(align_corners=False)`` assumes, nor is it
the same at every size: with symmetric padding (ResNet, the PDN) it is a constant, with TF "SAME"
padding (EfficientNet-Lite) the padding before each stride-2 layer is 0 on an even input and 1 on an
odd one, so the cells move by up to ``stride - 1`` px with the size's parity at each stage. The grid is
read off the network's own convolutions and poolings: a forward hook on each records where its output
cells sit in its input, and the chain from the image to each layer's grid is composed from those.
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
from torch import Tensor, nn

from anomaly.backbones.feature_cache import FrozenNetwork

_DYNAMIC_SAME = (Conv2dSame, Conv2dSameExport, AvgPool2dSame, MaxPool2dSame)  # pad by timm's get_same_padding
_SPATIAL = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


class Axis(NamedTuple):
    """Cell ``i`` along one axis is centred on input pixel ``offset + stride·i``."""

    offset: float
    stride: float

    def then(self, inner: "Axis") -> "Axis":
        """The axis of a grid laid out as ``inner`` on this axis's cells."""
        return Axis(self.offset + self.stride * inner.offset, self.stride * inner.stride)


class Step(NamedTuple):
    """One spatial module along one axis: an input of ``length`` cells gives ``out_length`` at ``axis``."""

    length: int
    out_length: int
    axis: Axis


class GridGeometry:
    """``geometry(network, image_size)`` → per output layer of the frozen ``network`` (in its order) the
    ``(rows, cols)`` axes of its grid, remembered per image size.

    The first call for an image size runs the network's uncached :meth:`~FrozenNetwork.compute` once on a
    zero image ``[1, 3, H, W]`` with hooks on its convolutions and poolings (its ``forward`` may read the
    feature cache and run none). The owner of a network keeps one (a network swapped for an equal one, as
    tiling does, keeps it valid).
    """

    def __init__(self) -> None:
        self._known: dict[tuple[int, int], list[tuple[Axis, Axis]]] = {}

    def __call__(self, network: FrozenNetwork, image_size: Sequence[int]) -> list[tuple[Axis, Axis]]:
        size = (int(image_size[0]), int(image_size[1]))
        if size not in self._known:
            self._known[size] = probe_geometry(network, size, network.compute)
        return self._known[size]


def probe_geometry(
    network: nn.Module,
    image_size: tuple[int, int],
    forward: Callable[[Tensor], Tensor | dict[str, Tensor]] | None = None,
) -> list[tuple[Axis, Axis]]:
    """The ``(rows, cols)`` axes of each output grid of ``network`` for images of ``image_size``.

    ``forward`` runs the network's convolutions on the probe image (default: ``network`` itself); it returns
    ``{layer: [B, C, h, w]}`` or one ``[B, C, h, w]``."""
    steps: tuple[list[Step], list[Step]] = ([], [])

    def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        for dim in (0, 1):
            sizes = int(inputs[0].shape[2 + dim]), int(output.shape[2 + dim])  # ints also under jit.trace
            steps[dim].append(module_step(module, dim, *sizes))

    handles = [m.register_forward_hook(record) for m in network.modules() if isinstance(m, _SPATIAL)]
    try:
        parameter = next(network.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        with torch.no_grad():
            outputs = (forward or network)(torch.zeros(1, 3, *image_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return [
        tuple(
            compose(steps[dim], image_size[dim], int(feature.shape[2 + dim]), f"layer {name!r}")
            for dim in (0, 1)
        )
        for name, feature in (outputs.items() if isinstance(outputs, dict) else [("output", outputs)])
    ]


def module_step(module: nn.Module, dim: int, length: int, out_length: int) -> Step:
    """Where ``module``'s output cells sit along ``dim`` of its input (0 = rows, 1 = cols)."""
    kernel, stride, dilation, padding = (
        _pair(getattr(module, name, default))[dim]
        for name, default in (("kernel_size", 1), ("stride", 1), ("dilation", 1), ("padding", 0))
    )
    span = (kernel - 1) * dilation + 1
    if isinstance(module, _DYNAMIC_SAME):
        before = max((-(-length // stride) - 1) * stride + span - length, 0) // 2
    elif padding == "same":
        before = (span - 1) // 2
    else:
        before = 0 if padding == "valid" else padding
    return Step(length, out_length, Axis((span - 1) / 2 - before, stride))


def compose(steps: list[Step], length: int, out_length: int, what: str) -> Axis:
    """Chains the steps that take ``length`` cells (the image) to ``out_length`` (a layer's grid).

    A step that keeps the length and centres its cells on the input's is no step; branches that run in
    parallel (a ResNet block's shortcut and its convolutions) must agree, as their outputs are added.
    """
    moves: dict[int, set[Step]] = {}
    for step in steps:
        if step.out_length != step.length or step.axis != Axis(0.0, 1):
            moves.setdefault(step.length, set()).add(step)
    axis, at = Axis(0.0, 1), length
    while at != out_length:
        options = moves.get(at, set())
        if len(options) != 1 or next(iter(options)).out_length == at:
            found = sorted(options) or "none"
            raise ValueError(
                f"cannot tell where the cells of {what} ({out_length} cells from {length} px) lie: "
                f"from {at} cells the network's convolutions and poolings lead to {found}"
            )
        step = next(iter(options))
        axis, at = axis.then(step.axis), step.out_length
    return axis


def _pair(value: object) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def linear_weights(axis: Axis, cells: int, positions: Tensor) -> Tensor:
    """``[len(positions), cells]`` weights that read a grid laid out on ``axis`` at input pixel
    ``positions``: linear between the two cell centres around each, the edge cell's value beyond them."""
    at = ((positions - axis.offset) / axis.stride).clamp(0, cells - 1)
    low = at.floor().clamp(max=max(cells - 2, 0))
    high_share = (at - low)[:, None]
    cell = torch.arange(cells, dtype=positions.dtype, device=positions.device)
    return (cell == low[:, None]) * (1 - high_share) + (cell == low[:, None] + 1) * high_share


def cell_centres(axis: Axis, cells: int, like: Tensor) -> Tensor:
    """``[cells]`` image pixel positions of the cell centres, in ``like``'s dtype and device."""
    return axis.offset + axis.stride * torch.arange(cells, dtype=like.dtype, device=like.device)


def pixel_positions(length: int, like: Tensor) -> Tensor:
    return torch.arange(length, dtype=like.dtype, device=like.device)


def resample_linear(
    feature: Tensor, axes: tuple[Axis, Axis], onto: tuple[Axis, Axis], size: Sequence[int]
) -> Tensor:
    """``[B, C, h, w]`` on ``axes`` → ``[B, C, *size]`` on the grid ``onto``, interpolated linearly."""
    rows = linear_weights(axes[0], feature.shape[-2], cell_centres(onto[0], size[0], feature))
    cols = linear_weights(axes[1], feature.shape[-1], cell_centres(onto[1], size[1], feature))
    return rows @ feature @ cols.T
