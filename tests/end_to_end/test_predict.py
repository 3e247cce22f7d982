"""anomaly-predict's library side (anomaly.prediction): corrupt files reported and the rest scored, the
saved threshold used, refusals."""

import csv
import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from anomaly.device import choose_device
from anomaly.errors import DataError
from anomaly.model_io import load_model
from anomaly.prediction import PredictionResult, predict_folder

pytestmark = pytest.mark.slow  # commands and whole runs: seconds to a minute each


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory, run_training):
    tmp_path = tmp_path_factory.mktemp("predict")
    _, run_dir = run_training(tmp_path, ["method=padim", "logger=none"])
    return run_dir


def predict(model: Path, inputs: Path, output_dir: Path) -> PredictionResult:
    """``predict_folder`` with the settings of ``configs/predict.yaml``, in this process."""
    return predict_folder(
        model, str(inputs), output_dir, threshold=None, pixel_threshold=None, batch_size=4, num_workers=0,
        device=choose_device("auto"), save_overlays=True, drift_alpha=0.01,
    )  # fmt: skip


def test_predict_folder_with_a_corrupt_file_scores_the_rest(fitted_run, tmp_path):
    data_root = fitted_run.parents[1] / "shared-data" / "synthetic" / "fabric" / "test"
    folder = tmp_path / "line"
    folder.mkdir()
    images = sorted((data_root / "good").glob("*.png"))[:3] + sorted(data_root.glob("[!g]*/*.png"))[:3]
    for i, image in enumerate(images):
        shutil.copy(image, folder / f"{i:02d}_{image.parent.name}.png")
    (folder / "99_broken.png").write_bytes(b"\x89PNG truncated")

    result = predict(fitted_run, folder, tmp_path / "out")
    assert (result.scored, result.unreadable, result.not_used) == (6, 1, 0)
    rows = list(csv.DictReader(result.csv_path.open()))
    assert len(rows) == 7
    broken = [r for r in rows if "99_broken" in r["path"]]
    assert len(broken) == 1 and "Cannot read image" in broken[0]["error"] and broken[0]["image_score"] == ""
    scored = [r for r in rows if r["error"] == ""]
    assert len(scored) == 6 and all(r["is_anomalous"] in ("0", "1") for r in scored)
    good = [float(r["normalised_score"]) for r in scored if "good" in r["path"]]
    defective = [float(r["normalised_score"]) for r in scored if "good" not in r["path"]]
    assert max(good) < min(defective)
    assert len(list((tmp_path / "out" / "images").glob("*_overlay.png"))) == 6
    assert len(list((tmp_path / "out" / "images").glob("*_mask.png"))) == 6


def test_predict_uses_the_saved_threshold_and_scores_like_the_model(fitted_run, tmp_path):
    loaded = load_model(fitted_run)
    assert loaded.calibration is not None
    good_dir = fitted_run.parents[1] / "shared-data" / "synthetic" / "fabric" / "test" / "good"
    image = next(good_dir.glob("*.png"))
    result = predict(fitted_run, image, tmp_path / "out")
    rows = list(csv.DictReader(result.csv_path.open()))
    score = float(rows[0]["image_score"])
    assert rows[0]["is_anomalous"] == str(int(score > loaded.calibration.threshold)) == str(result.anomalous)
    summary = json.loads(result.summary_path.read_text())
    assert summary == result.summary
    assert summary["images"] == 1 and 0.0 <= summary["drift_p_value"] <= 1.0


def test_model_file_of_another_format_version_is_refused(fitted_run, tmp_path):
    source = fitted_run / "model.safetensors"
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
    newer = tmp_path / "model.safetensors"
    save_file(load_file(str(source)), str(newer), metadata={**metadata, "format_version": "99"})
    with pytest.raises(ValueError, match="format version 99"):
        load_model(newer)
    assert metadata["method"] == "padim"


def test_nothing_readable_is_an_error_not_an_empty_success(fitted_run, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"None of the 1 input image\(s\) could be read"):
        predict(fitted_run, tmp_path / "broken.png", tmp_path / "out")
