"""Model files are data: loading one never runs code named or pickled in it, and damage is named."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from anomaly.backbones import FeatureExtractor
from anomaly.calibration import fit_calibration
from anomaly.data.preprocessing import Preprocessing
from anomaly.errors import ModelFileError
from anomaly.methods.padim.model import Padim
from anomaly.model_io import find_model_file, load_model, save_model

BACKBONE = {"name": "resnet18", "layers": ["layer1", "layer2"], "weights": None, "fold_batch_norms": True}


class Payload:
    """Unpickling it creates ``marker``: proof that the file's code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def pickle_hex(marker) -> str:
    return pickle.dumps(Payload(str(marker))).hex()


def torch_load_payload(marker) -> dict:
    """``torch.load(BytesIO(<pickle>), weights_only=False)`` as Hydra ``instantiate`` would build it."""
    return {
        "_target_": "torch.load",
        "f": {
            "_target_": "io.BytesIO",
            "initial_bytes": {"_target_": "builtins.bytes.fromhex", "_args_": [pickle_hex(marker)]},
        },
        "weights_only": False,
    }


def write_file(path, metadata: dict) -> None:
    save_file(
        {"x": torch.zeros(1)},
        str(path),
        metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()},
    )


def v2_metadata(model: dict, method: str = "padim") -> dict:
    return {
        "format_version": "2",
        "method": method,
        "model": model,
        "preprocessing": {"image_size": 64, "crop_size": None},
        "calibration": None,
    }


def test_the_payload_of_an_older_format_file_does_not_run(tmp_path):
    """The format the landed main read, whose loader passed ``config.method.model`` to Hydra's
    ``instantiate``: that loader ran this payload (checked when this test was written)."""
    marker = tmp_path / "pwned"
    config = {
        "method": {"name": "padim", "model": torch_load_payload(marker)},
        "transform": {"image_size": 64, "crop_size": None},
    }
    write_file(tmp_path / "model.safetensors", {"format_version": "1", "config": config, "calibration": None})
    assert pickle.loads(bytes.fromhex(pickle_hex(tmp_path / "control"))) is not None  # the payload works
    assert (tmp_path / "control").exists()
    with pytest.raises(ModelFileError, match="format version 1"):
        load_model(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "place",
    ["top", "nested_backbone", "as_value", "partial", "args", "method_name", "interpolation"],
)
def test_crafted_current_format_files_are_refused_without_running_anything(tmp_path, place):
    marker = tmp_path / "pwned"
    payload = torch_load_payload(marker)
    method, model = "padim", {"backbone": dict(BACKBONE), "n_features": 10}
    if place == "top":
        model = {**model, **payload}
    elif place == "nested_backbone":
        model["backbone"] = {**BACKBONE, "_target_": "torch.load", "f": payload["f"]}
    elif place == "as_value":
        model["n_features"] = payload
    elif place == "partial":
        model = {**model, "_partial_": True, "_target_": "builtins.exec"}
    elif place == "args":
        model = {**model, "_args_": [payload]}
    elif place == "method_name":
        method = "torch.load"
    elif place == "interpolation":
        model["backbone"]["name"] = "${oc.env:HOME}"
    write_file(tmp_path / "model.safetensors", v2_metadata(model, method))
    with pytest.raises(ModelFileError) as error:
        load_model(tmp_path / "model.safetensors")
    assert str(tmp_path) in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "random_bytes", "empty", "foreign_safetensors", "not_json"])
def test_damaged_or_foreign_files_name_the_path_and_the_fix(tmp_path, damage):
    path = tmp_path / "model.safetensors"
    if damage == "truncated":
        write_file(path, v2_metadata({"n_features": 10}))
        path.write_bytes(path.read_bytes()[:40])
    elif damage == "random_bytes":
        path.write_bytes(torch.randint(0, 256, (500,), dtype=torch.uint8).numpy().tobytes())
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "foreign_safetensors":
        save_file({"weight": torch.zeros(3)}, str(path))
    else:
        write_file(path, {**v2_metadata({}), "model": "{not json"})
    with pytest.raises(ModelFileError, match=rf"{path}.*(anomaly-train)"):
        load_model(path)


def test_a_model_is_found_by_its_run_dir_or_its_file_and_a_missing_one_is_named(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert find_model_file(tmp_path) == tmp_path / "model.safetensors"
    assert find_model_file(str(tmp_path / "model.safetensors")) == tmp_path / "model.safetensors"
    (tmp_path / "empty_run").mkdir()
    for missing in (tmp_path / "empty_run", tmp_path / "other.safetensors"):
        with pytest.raises(ModelFileError, match=r"does not exist: pass model=<run dir>") as error:
            find_model_file(missing)
        assert str(missing) in str(error.value) and "anomaly-train" in str(error.value)


@pytest.mark.filterwarnings("ignore:backbone resnet18 is randomly initialised")
def test_a_fitted_model_round_trips_with_preprocessing_and_calibration(tmp_path):
    backbone = FeatureExtractor(**BACKBONE)  # random init: its weights must then be stored too
    model = Padim(backbone, n_features=20, seed=3)
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model.collect(images)
    model.fit()
    config = {"_target_": "anomaly.methods.padim.model.Padim", "n_features": 20, "seed": 3,
              "backbone": {"_target_": "anomaly.backbones.FeatureExtractor", **BACKBONE}}  # fmt: skip
    scores = torch.linspace(1.0, 2.0, 60)
    calibration = fit_calibration(scores, scores, 0.05, 0.05, 0.9, source="held-out split")
    save_model(
        model, "padim", config, Preprocessing([64, 64], None), tmp_path / "model.safetensors", calibration
    )

    loaded = load_model(tmp_path)
    assert loaded.method == "padim" and loaded.calibration == calibration
    assert loaded.preprocessing == Preprocessing((64, 64), None)
    expected, actual = model.eval()(images), loaded.model(images)
    assert torch.equal(expected.anomaly_map, actual.anomaly_map)


@pytest.mark.filterwarnings("ignore:backbone resnet18 is randomly initialised")
def test_saving_refuses_a_class_the_loader_would_not_build(tmp_path):
    model = Padim(FeatureExtractor(**BACKBONE), n_features=20)
    config = {"_target_": "anomaly.methods.patchcore.model.PatchCore", "backbone": BACKBONE}
    with pytest.raises(ValueError, match=r"PatchCore.* is not anomaly.methods.padim.model.Padim"):
        save_model(model, "padim", config, Preprocessing(64), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="not one of the methods"):
        save_model(model, "mine", {}, Preprocessing(64), tmp_path / "model.safetensors")
