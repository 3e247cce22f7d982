"""Anomaly maps line up with the image at every size: a defect's map peak sits on the defect.

Where a feature cell lies is measured here independently of :mod:`anomaly.backbones.geometry`: the
middle of the box of input pixels its value depends on (nonzero gradient, float64), for a cell whose box
the image does not clip. The methods' maps are checked with "box" networks: the real architectures with
every convolution an average (constant positive weights, no bias), so that a bright square on a dark
image gives a response symmetric about each cell's centre, and a method fitted on the dark image scores
each cell by that response. A square centred on a cell's centre must then give the map's peak within
1 px of the square's centre (2 px near a border: :func:`assert_peaks_on_defects`), at image sizes that are
odd, prime, not multiples of 32, tall and wide. Before the fix the maps were off by 1.5 px at every even
size (ResNet, EfficientAD) and by up to a stride with TF "SAME" padding and PaDiM's nearest upsampling.
"""

import copy
import functools

import pytest
import torch
from torch import Tensor, nn

from anomaly.backbones import FeatureExtractor, PatchFeatures
from anomaly.backbones.geometry import GridGeometry, probe_geometry
from anomaly.data.preprocessing import Preprocessing
from anomaly.deploy.formats import export_onnx, graph_ready, load_exported
from anomaly.deploy.preprocess import ExportedModel, Preprocess
from anomaly.detector import Detector
from anomaly.methods.efficientad.model import EfficientAD, patch_description_network
from anomaly.methods.padim.model import Padim
from anomaly.methods.patchcore.model import PatchCore
from anomaly.methods.simplenet.model import SimpleNet

SIZES = [(96, 97), (97, 97), (100, 100), (61, 83), (83, 61)]
BACKGROUND, DEFECT = 0.3, 1.0  # dark: the first convolution's ReLU zeroes it; the square is white
HALF = 2  # the square is 5×5, centred on its pixel
CPU = torch.device("cpu")
BACKBONES = {  # (name, layers) as the methods' configs use them
    "resnet18": ("resnet18", ["layer1", "layer2", "layer3"]),
    "lite0": ("efficientnet_lite0", ["blocks.1", "blocks.2", "blocks.4"]),
}


pytestmark = [
    pytest.mark.filterwarnings("ignore:backbone .* is randomly initialised"),
    pytest.mark.slow,  # real architectures: 5-25 s a test on a loaded 2-core machine, the ONNX export ~1 min
]


@functools.cache
def built(key: str, layers: tuple[str, ...]) -> FeatureExtractor:
    return FeatureExtractor(BACKBONES[key][0], layers, weights=None)


def extractor(key: str, layers: list[str] | None = None) -> FeatureExtractor:
    """A fresh copy of the random-init backbone (tracing one takes seconds on a loaded CPU)."""
    return copy.deepcopy(built(key, tuple(layers or BACKBONES[key][1])))


def box_filters_(network: nn.Module) -> nn.Module:
    """Every convolution an average over its window and input channels, without bias (in place)."""
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.fill_(1.0 / module.weight[0].numel())
                if module.bias is not None:
                    module.bias.zero_()
    return network


def touched_span(network: nn.Module, size: tuple[int, int], layer: int, offset: int | None) -> tuple:
    """``(first_row, last_row, first_col, last_col)`` of the input pixels that one cell depends on (cell
    ``(offset, offset)``, or ``offset`` cells past the middle one if it is not None) and the layer's grid
    size ``(h, w)``, from the nonzero gradient."""
    image = torch.rand(1, 3, *size, requires_grad=True)
    output = network(image)
    feature = list(output.values())[layer] if isinstance(output, dict) else output
    height, width = feature.shape[-2:]
    row, col = (0, 0) if offset is None else (height // 2 + offset, width // 2 + offset)
    feature[0, :, row, col].abs().sum().backward()
    touched = image.grad.abs().sum(dim=(0, 1)) > 0  # [H, W]
    rows, cols = touched.any(dim=1).nonzero().flatten(), touched.any(dim=0).nonzero().flatten()
    return (rows[0].item(), rows[-1].item(), cols[0].item(), cols[-1].item()), tuple(feature.shape[-2:])


def measured_centres(network: nn.Module, size: tuple[int, int], layer: int = 0) -> tuple[Tensor, Tensor]:
    """Pixel centres ``[h], [w]`` of a layer's cells: the receptive field's width and the stride are
    measured on a 192-px image (the middle cell and the next, unclipped); cell 0's field at ``size``,
    clipped by the image only before it, ends (width - 1)/2 px after its centre; the cells follow by
    the stride."""
    (top, bottom, left, right), _ = touched_span(network, (192, 192), layer, 0)
    (next_top, _, next_left, _), _ = touched_span(network, (192, 192), layer, 1)
    assert top > 0 and bottom < 191 and left > 0 and right < 191, "field wider than the probe image"
    stride = (next_top - top, next_left - left)
    (_, last_row, _, last_col), grid = touched_span(network, size, layer, None)
    assert last_row < size[0] - 1 and last_col < size[1] - 1, "field wider than the image"
    return (
        last_row - (bottom - top) / 2 + stride[0] * torch.arange(grid[0]),
        last_col - (right - left) / 2 + stride[1] * torch.arange(grid[1]),
    )


def defect_images(network: nn.Module, size: tuple[int, int]) -> tuple[Tensor, list[tuple]]:
    """One image per centre of the network's deepest cells at least 16 px from every border, not on the
    grid's outer cells (the map is flat beyond their centres), up to three rows by three columns (the
    outermost and the middle one), each with a white 5×5 square centred there; and those centres.

    The deepest layer's centres are centres of every layer's cells; between them the coarser layers,
    interpolated, pull the peak toward their nearest centre (up to 2 px measured, PaDiM on ResNet18).
    The cells' places come from :func:`probe_geometry`, which the last test checks independently."""
    rows, cols = probe_geometry(network, size)[-1]
    output = network(torch.zeros(1, 3, *size))
    grid = (list(output.values())[-1] if isinstance(output, dict) else output).shape[-2:]
    keep = [
        [axis.offset + axis.stride * i for i in range(1, cells - 1)]
        for axis, cells in ((rows, grid[0]), (cols, grid[1]))
    ]
    keep = [[p for p in kept if 16 <= p <= side - 17] for kept, side in zip(keep, size, strict=True)]
    assert keep[0] and keep[1], f"no deep cell 16 px inside an image of {size}"
    spread = [sorted({kept[0], kept[len(kept) // 2], kept[-1]}) for kept in keep]
    picks = [(row, col) for row in spread[0] for col in spread[1]]
    images = torch.full((len(picks), 3, *size), BACKGROUND)
    for image, (row, col) in zip(images, picks, strict=True):
        assert row == int(row) and col == int(col), "a cell centre between pixels: no square centred on it"
        image[:, int(row) - HALF : int(row) + HALF + 1, int(col) - HALF : int(col) + HALF + 1] = DEFECT
    return images, picks


def assert_peaks_on_defects(maps: Tensor, centres: list[tuple], what: str) -> None:
    """Within 1 px of each square's centre; 2 px closer than 32 px (two stride-16 cells) to a border,
    where the deepest layer's field runs into the zero padding and its response is no longer symmetric."""
    height, width = maps.shape[-2:]
    for anomaly_map, (row, col) in zip(maps, centres, strict=True):
        peak_row, peak_col = divmod(int(anomaly_map.flatten().argmax()), width)
        inside = min(row, col, height - 1 - row, width - 1 - col) >= 32
        bound = 1 if inside else 2
        assert abs(peak_row - row) <= bound and abs(peak_col - col) <= bound, (
            f"{what}: peak at ({peak_row}, {peak_col}), square centred at ({row}, {col})"
        )


def fitted_padim(backbone: nn.Module, size: tuple[int, int]) -> Padim:
    model = Padim(backbone, n_features=32, seed=0)
    model.collect(torch.full((2, 3, *size), BACKGROUND))
    model.fit()
    return model.eval()


def fitted_patchcore(backbone: nn.Module, size: tuple[int, int]) -> PatchCore:
    features = PatchFeatures(backbone, pre_embed_dim=64, target_embed_dim=64)
    model = PatchCore(features, coreset_ratio=1.0, num_neighbors=1, knn_backend="torch")
    model.collect(torch.full((1, 3, *size), BACKGROUND))
    model.fit()
    return model.eval()


def scoring_simplenet(backbone: nn.Module) -> SimpleNet:
    """Adaptor the identity, discriminator minus the features' mean: a patch scores its mean feature."""
    features = PatchFeatures(backbone, pre_embed_dim=64, target_embed_dim=64)
    model = SimpleNet(features, discriminator_hidden=1)
    with torch.no_grad():
        model.adaptor.weight.copy_(torch.eye(64))
        model.adaptor.bias.zero_()
        first, _, _, last = model.discriminator
        first.weight.fill_(1 / 64)
        first.bias.zero_()
        last.weight.fill_(-1.0)
    return model.eval()


def box_efficientad(model_size: str) -> EfficientAD:
    """The teacher a box PDN; student and autoencoder all zero: the map is the teacher's mean square."""
    model = EfficientAD(model_size=model_size, out_channels=8)
    box_filters_(model.teacher)
    with torch.no_grad():
        for parameter in [*model.student.parameters(), *model.autoencoder.parameters()]:
            parameter.zero_()
    model.teacher_mean, model.teacher_std = torch.zeros(1, 8, 1, 1), torch.ones(1, 8, 1, 1)
    model.quantiles_st, model.quantiles_ae = torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0])
    return model.eval()


@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("key", BACKBONES)
def test_padim_and_patchcore_maps_peak_on_the_defect(key, size):
    backbone = box_filters_(extractor(key))
    images, centres = defect_images(backbone, size)
    assert_peaks_on_defects(fitted_padim(backbone, size)(images).anomaly_map, centres, f"PaDiM {key} {size}")

    layers = BACKBONES[key][1][1:]  # PatchCore's layers: the second and third
    backbone = box_filters_(extractor(key, layers))
    images, centres = defect_images(backbone, size)
    maps = fitted_patchcore(backbone, size)(images).anomaly_map
    assert_peaks_on_defects(maps, centres, f"PatchCore {key} {size}")


@pytest.mark.parametrize("size", SIZES[:2] + SIZES[3:4], ids=str)
def test_simplenet_map_peaks_on_the_defect(size):
    layers = BACKBONES["lite0"][1][1:]
    model = scoring_simplenet(box_filters_(extractor("lite0", layers)))
    images, centres = defect_images(model.features.backbone, size)
    assert_peaks_on_defects(model(images).anomaly_map, centres, f"SimpleNet {size}")


@pytest.mark.parametrize("size", SIZES[:2] + SIZES[3:4], ids=str)
@pytest.mark.parametrize("model_size", ["small"])  # medium: the same geometry (tested below), 4x slower
def test_efficientad_map_peaks_on_the_defect(model_size, size):
    model = box_efficientad(model_size)
    images, centres = defect_images(model.teacher, size)
    assert_peaks_on_defects(model(images).anomaly_map, centres, f"EfficientAD-{model_size} {size}")


@pytest.mark.parametrize("size", [(61, 83), (160, 161)], ids=str)
@pytest.mark.parametrize("key", BACKBONES)
def test_probed_geometry_is_where_the_receptive_fields_are_centred(key, size):
    """Every layer whose receptive field fits, ResNet's symmetric and Lite0's TF "SAME" padding."""
    checked = 0
    for layer, (rows, cols) in enumerate(probe_geometry(extractor(key), size)):
        try:
            expected_rows, expected_cols = measured_centres(extractor(key), size, layer)
        except AssertionError:  # the receptive field does not fit in the image
            continue
        checked += 1
        assert rows.offset + rows.stride * torch.arange(len(expected_rows)) == pytest.approx(expected_rows)
        assert cols.offset + cols.stride * torch.arange(len(expected_cols)) == pytest.approx(expected_cols)
    assert checked >= (2 if size[0] > 150 else 1)  # resnet18's layer3 field (211 px) never fits


@pytest.mark.parametrize("model_size", ["small", "medium"])
def test_probed_pdn_geometry_is_where_its_receptive_fields_are_centred(model_size):
    """EfficientAD's PDN (no padding, even kernels): cell i on pixel 4i + 16 at every size. Box filters: a
    random-init PDN can zero a cell's every path through its ReLUs (then no gradient shows its field; seen
    once in CI for the medium PDN), positive averages on positive images keep every path alive."""
    network = box_filters_(patch_description_network(8, model_size))
    for size in [(96, 97), (61, 83)]:
        ((rows, cols),) = probe_geometry(network, size)
        expected_rows, expected_cols = measured_centres(network, size)
        assert (rows, cols) == ((16.0, 4), (16.0, 4))
        assert rows.offset + rows.stride * torch.arange(len(expected_rows)) == pytest.approx(expected_rows)
        assert cols.offset + cols.stride * torch.arange(len(expected_cols)) == pytest.approx(expected_cols)


def test_detector_score_maps_peak_on_the_defect():
    """The library path: uint8 images through :class:`Detector` (the training preprocessing) and back."""
    size = (96, 97)
    backbone = box_filters_(extractor("lite0"))
    detector = Detector(fitted_padim(backbone, size), "padim", Preprocessing(list(size)), None, CPU)
    images, centres = defect_images(backbone, size)
    maps = detector.score((images * 255).round().to(torch.uint8)).anomaly_maps
    assert_peaks_on_defects(maps, centres, f"Detector.score PaDiM lite0 {size}")


@pytest.mark.parametrize(("key", "size"), [("resnet18", (61, 83)), ("lite0", (96, 97))])
def test_exported_onnx_map_peaks_on_the_defect(key, size, tmp_path):
    """The export path (anomaly.deploy): the geometry is found while torch.export traces the model."""
    pytest.importorskip("onnxruntime")
    backbone = box_filters_(extractor(key))
    images, centres = defect_images(backbone, size)
    model = graph_ready(fitted_padim(backbone, size))
    model.geometry = GridGeometry()  # nothing remembered from fitting: tracing must probe it
    exported = ExportedModel(Preprocess(size, Preprocessing(list(size))), model).eval()
    uint8 = (images * 255).round().to(torch.uint8)
    export_onnx(exported, uint8[:2], tmp_path / "model.onnx", 18, True, {})
    maps, _ = load_exported(tmp_path / "model.onnx", "onnx", CPU)(uint8)
    assert_peaks_on_defects(maps, centres, f"ONNX PaDiM {key} {size}")
