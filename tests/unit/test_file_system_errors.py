"""File-system faults and bad values that used to end in a raw traceback: each is the user's error, named
(the path or value) with its fix, and found before any work where it can be."""

import errno
import os
import tempfile
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from safetensors import SafetensorError

import anomaly
from anomaly.errors import ConfigError, FileSystemError, describe_user_error
from anomaly.experiment import build_model, check_settings, resources_of
from anomaly.methods.patchcore import spill as spill_module
from anomaly.methods.patchcore.spill import PatchSpill
from anomaly.methods.postprocess import gaussian_blur
from anomaly.model_io import load_model, save_model

FULL_DISK = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors 0.8


@pytest.mark.filterwarnings("ignore:backbone resnet18 is randomly initialised")
def test_a_full_disk_while_the_model_file_is_written_names_it(padim_file, tmp_path, monkeypatch):
    """safetensors raises a SafetensorError, not an OSError: it is the user's full disk all the same."""
    loaded = load_model(padim_file)
    target = tmp_path / "model.safetensors"

    def full_disk(*args, **kwargs) -> None:
        raise SafetensorError(FULL_DISK)

    monkeypatch.setattr("anomaly.model_io.save_file", full_disk)
    with pytest.raises(OSError) as raised:
        save_model(loaded.model, "padim", loaded.config, loaded.preprocessing, target, loaded.calibration)
    message = describe_user_error(raised.value)
    assert message is not None and str(target) in message and "The disk is full" in message, message
    assert "hydra.run.dir=" in message
    assert not list(tmp_path.iterdir())  # no partial or temporary file left


@pytest.mark.filterwarnings("ignore:backbone resnet18 is randomly initialised")
def test_other_safetensors_errors_keep_their_traceback(padim_file, tmp_path, monkeypatch):
    def refused(*args, **kwargs) -> None:
        raise SafetensorError("Error while serializing: some bug")

    monkeypatch.setattr("anomaly.model_io.save_file", refused)
    loaded = load_model(padim_file)
    with pytest.raises(SafetensorError) as raised:
        save_model(loaded.model, "padim", loaded.config, loaded.preprocessing, tmp_path / "m.safetensors")
    assert describe_user_error(raised.value) is None


def test_a_blur_wider_than_the_map_names_the_largest_sigma_that_fits():
    with pytest.raises(ConfigError, match=r"blur_sigma=20 blurs over ±80 px.*64 px.*blur_sigma < 15\.875"):
        gaussian_blur(torch.rand(1, 1, 64, 64), 20.0)
    gaussian_blur(torch.rand(1, 1, 64, 64), 15.8)  # the largest that fits: no error


def composed(*overrides: str):
    return anomaly.compose(list(overrides), output_dir=Path(tempfile.gettempdir()) / "not-written")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("evaluation.exact_pixel_limit=-1", r"evaluation\.exact_pixel_limit must be an int >= 0.*got -1"),
        ("evaluation.aupro_fpr_limit=0", r"evaluation\.aupro_fpr_limit must be a number in \(0, 1\], got 0"),
        ("evaluation.aupro_fpr_limit=nan", r"evaluation\.aupro_fpr_limit must be a number in"),
        ("evaluation.histogram_bins=1", r"evaluation\.histogram_bins must be an int >= 2, got 1"),
        ("evaluation.num_examples=-2", r"evaluation\.num_examples must be an int >= 0, got -2"),
        ("evaluation.num_examples=2.5", r"evaluation\.num_examples must be an int >= 0, got 2\.5"),
    ],
)
def test_evaluation_values_are_checked_up_front(override, expected):
    with pytest.raises(ConfigError, match=expected):
        check_settings(composed(override))


def test_the_shipped_settings_pass_the_up_front_check():
    check_settings(composed())


def test_a_bad_evaluation_value_stops_the_run_before_the_fit(tmp_path, monkeypatch):
    """Refused before the data module is built (so before the fit and the model file), not at testing."""
    cfg = anomaly.compose(["evaluation.exact_pixel_limit=-1", "logger=none"], output_dir=tmp_path / "run")
    with open_dict(cfg):
        cfg.paths.results_db = None

    def no_data(*args, **kwargs):
        raise AssertionError("the data module was built: work started before the check")

    monkeypatch.setattr("anomaly.experiment.instantiate", no_data)
    with pytest.raises(ConfigError, match=r"evaluation\.exact_pixel_limit"):
        anomaly.run(cfg)
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_a_spill_dir_that_is_no_folder_is_refused_before_any_work(tmp_path, kind):
    spill_dir = tmp_path / "scratch"
    if kind == "file":
        spill_dir.write_text("not a folder")
    what = "is a file" if kind == "file" else "does not exist"
    with pytest.raises(ConfigError, match=f"paths.spill_dir={spill_dir} {what}"):
        check_settings(composed(f"paths.spill_dir={spill_dir}"))
    check_settings(composed(f"paths.spill_dir={tmp_path}"))  # a folder: fine


def test_spill_dir_is_a_run_setting_not_a_model_value():
    cfg = composed("method=patchcore")
    assert "spill_dir" not in cfg.method.model and cfg.paths.spill_dir is None


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_a_spill_folder_that_is_no_folder_names_it_and_the_setting(tmp_path, kind):
    """The same through the Python API (PatchCore without anomaly-train's check)."""
    folder = tmp_path / "scratch"
    if kind == "file":
        folder.write_text("not a folder")
    with PatchSpill(str(folder)) as spill, pytest.raises(FileSystemError) as raised:
        spill.append(torch.ones(4, 3))
    message = describe_user_error(raised.value)
    assert str(folder) in message and "paths.spill_dir=<folder>" in message and "TMPDIR" in message


class FullDisk:
    """A file whose writes fail as on a full disk."""

    def seek(self, *args) -> int:
        return 0

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.parametrize("configured", [True, False])
def test_a_full_spill_folder_names_it_and_the_setting_not_the_outputs(tmp_path, monkeypatch, configured):
    monkeypatch.setattr(spill_module.tempfile, "TemporaryFile", lambda dir=None: FullDisk())
    with PatchSpill(str(tmp_path) if configured else None) as spill, pytest.raises(FileSystemError) as raised:
        spill.append(torch.ones(4, 3))
    message = describe_user_error(raised.value)
    folder = str(tmp_path) if configured else f"{tempfile.gettempdir()} (the system temp dir)"
    assert f"in {folder}: No space left on device" in message, message
    assert "paths.spill_dir=<folder>" in message and "TMPDIR=<folder>" in message
    assert "hydra.run.dir" not in message and "output" not in message


@pytest.mark.filterwarnings("ignore:backbone resnet18 is randomly initialised")
def test_backbone_weights_path_for_a_model_without_pretrained_weights_is_refused(padim_file):
    """Its random backbone's weights are in the file: a weights file would silently replace them."""
    with pytest.raises(ConfigError, match=r"backbone\.weights_path=/x\.pth: the model in .* has no"):
        load_model(padim_file, backbone_weights_path="/x.pth")


def test_the_run_hands_paths_spill_dir_to_patchcore(tmp_path):
    cfg = composed("method=patchcore", f"paths.spill_dir={tmp_path}")
    model = build_model(cfg, tiling=None, resources=resources_of(cfg))
    assert model.spill_dir == str(tmp_path)
    model.collect(torch.rand(1, 3, 64, 64))
    assert os.readlink(f"/proc/self/fd/{model._spill._file.fileno()}").startswith(str(tmp_path))
    model._spill.close()
