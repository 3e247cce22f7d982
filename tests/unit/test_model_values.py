"""Every value read from a model file is data to validate: finite, in range and of the shape the method's
config implies, before anything is scored; and a NaN score at run time is an error naming the image,
never a decision."""

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from anomaly.calibration import check_budgets, fit_calibration
from anomaly.errors import ConfigError, DataError, ModelFileError
from anomaly.methods.base import AnomalyOutput, check_finite
from anomaly.model_io import load_model


def rewritten(
    source: Path,
    target: Path,
    metadata: Callable[[dict], None] = lambda values: None,
    tensors: Callable[[dict], None] = lambda state: None,
) -> Path:
    """A copy of ``source`` whose JSON metadata (parsed, changed in place) or tensors were edited."""
    with safe_open(str(source), framework="pt") as handle:
        raw = handle.metadata()
    values = {
        key: text if key in ("format_version", "method") else json.loads(text) for key, text in raw.items()
    }
    metadata(values)
    state = load_file(str(source))
    tensors(state)
    encoded = {key: value if isinstance(value, str) else json.dumps(value) for key, value in values.items()}
    save_file(state, str(target), metadata=encoded)
    return target


def set_in(section: str, key: str, value) -> Callable[[dict], None]:
    def change(values: dict) -> None:
        values[section][key] = value

    return change


@pytest.mark.filterwarnings("ignore:backbone resnet18 is randomly initialised")
@pytest.mark.parametrize(
    ("name", "change", "expected"),
    [
        ("NaN threshold", set_in("calibration", "threshold", math.nan), "non-finite number NaN"),
        ("infinite pixel threshold", set_in("calibration", "pixel_threshold", math.inf), "Infinity"),
        ("NaN blur_sigma", set_in("model", "blur_sigma", math.nan), "non-finite number NaN"),
        ("negative blur_sigma", set_in("model", "blur_sigma", -1.0), "blur_sigma must be finite and >= 0"),
        ("blur_sigma too large to use", set_in("model", "blur_sigma", 1e300), "blur_sigma .* at most 10000"),
        ("blur_sigma beyond any image", set_in("model", "blur_sigma", 1e5), "blur_sigma .* at most 10000"),
        ("budget above 1", set_in("calibration", "false_alarm_rate", 1.5), "budgets and confidence"),
        ("order beyond the images", set_in("calibration", "order", 61), "order 61 of 60 images"),
        ("scores missing", set_in("calibration", "scores", [1.0]), "does not fit its 1 scores"),
        ("a float order", set_in("calibration", "order", 3.5), "order 3.5"),
        ("NaN calibration score", set_in("calibration", "scores", [math.nan] * 60), "non-finite number NaN"),
    ],
)
def test_non_finite_or_out_of_range_values_are_refused_naming_the_file(
    padim_file, tmp_path, name, change, expected
):
    bad = rewritten(padim_file, tmp_path / "bad.safetensors", metadata=change)
    with pytest.raises(ModelFileError, match=expected) as error:
        load_model(bad)
    assert str(bad) in str(error.value) and "anomaly-train" in str(error.value), name


@pytest.mark.filterwarnings("ignore:backbone resnet18 is randomly initialised")
@pytest.mark.parametrize(
    ("name", "change", "expected"),
    [
        ("NaN in the statistics", lambda s: s["mean"].view(-1)[7].fill_(math.nan), "'mean'.*1 non-finite"),
        (
            "infinite inverse covariance",
            lambda s: s["inv_covariance"].view(-1)[0].fill_(math.inf),
            "'inv_covariance'.*non-finite",
        ),
        ("statistics of another grid", lambda s: s.update(mean=s["mean"][:-3]), "do not fit its config"),
        (
            "channels of another config",
            lambda s: s.update(channel_index=s["channel_index"][:5]),
            "do not fit its config",
        ),
    ],
)
def test_damaged_tensors_are_refused_before_anything_is_scored(padim_file, tmp_path, name, change, expected):
    bad = rewritten(padim_file, tmp_path / "bad.safetensors", tensors=change)
    with pytest.raises(ModelFileError, match=expected) as error:
        load_model(bad)
    assert str(bad) in str(error.value), name


@pytest.mark.filterwarnings("ignore:backbone resnet18 is randomly initialised")
def test_the_untouched_file_loads_and_scores_finite(padim_file):
    loaded = load_model(padim_file)
    output = loaded.model(torch.rand(2, 3, 64, 64))
    assert torch.isfinite(output.image_score).all() and loaded.calibration.num_images == 60


def test_a_nan_score_names_the_image_and_is_never_a_decision():
    maps = torch.zeros(3, 1, 4, 4)
    maps[1, 0, 2, 2] = math.nan
    output = AnomalyOutput(maps, torch.tensor([0.1, 0.2, math.inf]))
    with pytest.raises(DataError, match=r"2 image\(s\) as NaN or infinity.*b\.png, c\.png") as error:
        check_finite(output, ["a.png", "b.png", "c.png"])
    assert "a.png" not in str(error.value)
    check_finite(AnomalyOutput(torch.zeros(1, 1, 4, 4), torch.zeros(1)), ["a.png"])  # finite: no error
    with pytest.raises(ConfigError, match="finite"):  # a calibration (and so its guarantee) never on NaN
        fit_calibration(torch.tensor([1.0, math.nan, 2.0]), torch.ones(3), 0.1, 0.1, 0.9, "held-out")


def test_threshold_settings_are_checked_before_any_work():
    for bad in (1.5, 0, -0.1, math.nan, "0.01", True):
        with pytest.raises(ConfigError, match=r"threshold\.false_alarm_rate must be a number in"):
            check_budgets(bad, 0.01, 0.95)
    with pytest.raises(ConfigError, match=r"threshold\.confidence"):
        check_budgets(0.01, 0.01, 1.0)
    check_budgets(0.01, 0.05, 0.95)


@pytest.mark.filterwarnings("ignore:backbone resnet18 is randomly initialised")
def test_predict_stops_on_an_image_the_model_scores_nan(padim_file, tmp_path, monkeypatch):
    """A model that scores one image NaN (here: one made to) stops predict naming that image, instead of a
    CSV row that reads "good"."""
    from omegaconf import OmegaConf

    import anomaly.cli.predict as predict_command

    loaded = load_model(padim_file)
    original_forward = loaded.model.forward

    def nan_for_bright_images(images):
        output = original_forward(images)
        bright = images.flatten(1).mean(dim=1) > 0.9
        return AnomalyOutput(output.anomaly_map, torch.where(bright, math.nan, output.image_score))

    loaded.model.forward = nan_for_bright_images
    monkeypatch.setattr(predict_command, "load_model", lambda *args, **kwargs: loaded)
    folder = tmp_path / "line"
    folder.mkdir()
    Image.new("RGB", (64, 64), (120, 110, 100)).save(folder / "a_normal.png")
    Image.new("RGB", (64, 64), (255, 255, 255)).save(folder / "b_white.png")
    cfg = OmegaConf.create({"model": str(padim_file), "input": str(folder), "batch_size": 4, "num_workers": 0,
                            "device": "cpu", "threshold": None, "pixel_threshold": None, "drift_alpha": 0.01,
                            "save_overlays": False})  # fmt: skip
    with pytest.raises(DataError, match=r"b_white\.png") as error:
        predict_command.predict(cfg, tmp_path / "out")
    assert "a_normal.png" not in str(error.value)
