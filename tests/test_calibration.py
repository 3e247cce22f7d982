import pytest
import torch

from anomaly.calibration import fit_calibration, metrics_at_threshold
from anomaly.model_io import load_model


def test_threshold_is_the_quantile_of_normal_scores_and_normalisation_maps_it_to_one():
    scores = torch.arange(1.0, 101.0)  # 1..100
    calibration = fit_calibration(scores, 0.99)
    assert calibration.threshold == pytest.approx(torch.quantile(scores.double(), 0.99).item())
    assert calibration.normal_median == pytest.approx(50.5)
    normalised = calibration.normalise(torch.tensor([50.5, calibration.threshold]))
    assert normalised.tolist() == pytest.approx([0, 1])
    with pytest.raises(ValueError, match="val_fraction"):
        fit_calibration(torch.tensor([1.0]), 0.99)


def test_metrics_at_threshold_by_hand():
    scores, labels = torch.tensor([0.1, 0.6, 0.4, 0.9, 0.7]), torch.tensor([0, 0, 1, 1, 1])
    metrics = metrics_at_threshold(scores, labels, 0.5)  # predicted: 0.6 (false alarm), 0.9, 0.7
    assert metrics["precision_at_threshold"] == pytest.approx(2 / 3)
    assert metrics["recall_at_threshold"] == pytest.approx(2 / 3)
    assert metrics["false_alarm_rate"] == pytest.approx(1 / 2)


def test_threshold_depends_on_normal_validation_images_only(tmp_path, run_training):
    """Two runs whose test sets differ (other defects, other labels) must get the same threshold,
    and it must be the quantile of the validation images' scores: fails if test data leaks in."""
    common = ["method=padim", "logger=none", "dataset.val_fraction=0.25", "threshold_quantile=0.9"]
    first, first_dir = run_training(tmp_path / "a", [*common, "dataset.n_test_defect=12"])
    second, _ = run_training(tmp_path / "b", [*common, "dataset.n_test_defect=4", "dataset.n_test_good=2"])
    assert first["threshold"] == pytest.approx(second["threshold"], rel=1e-6)
    assert first["image_f1_threshold"] != pytest.approx(second["image_f1_threshold"], rel=1e-3)

    loaded = load_model(first_dir)
    assert loaded.calibration.threshold == pytest.approx(first["threshold"])
    assert loaded.calibration.num_images == 4  # 25 % of the 16 normal training images
    assert 0.0 <= first["false_alarm_rate"] <= 1.0 and "f1_at_threshold" in first
