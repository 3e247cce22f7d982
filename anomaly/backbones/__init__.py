"""Frozen pretrained backbones that turn images into multi-layer feature maps."""

from anomaly.backbones.efficientnet_lite import LITE_VARIANTS, PACKAGED_WEIGHTS, map_lite_keys
from anomaly.backbones.feature_extractor import BACKBONES, BackboneSpec, FeatureExtractor
from anomaly.backbones.patch_features import PatchFeatures
from anomaly.errors import BackboneWeightsError

__all__ = [
    "BACKBONES",
    "LITE_VARIANTS",
    "PACKAGED_WEIGHTS",
    "BackboneSpec",
    "BackboneWeightsError",
    "FeatureExtractor",
    "PatchFeatures",
    "map_lite_keys",
]
