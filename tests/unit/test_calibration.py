"""Thresholds a line can trust: the false-alarm guarantee, cross-fits, pixel decisions, drift, updates."""

import logging

import numpy as np
import pytest
import torch
from scipy import stats

from anomaly.calibration import (
    CalibrationSource,
    choose_source,
    clopper_pearson_upper,
    drift,
    fit_calibration,
    guarantee,
    guaranteed_rate,
    metrics_at_threshold,
)
from anomaly.errors import ConfigError
from anomaly.methods.base import FitOnceModel
from anomaly.methods.padim.model import Padim
from anomaly.metrics.aupro import pixel_decisions
from anomaly.model_io import load_model


@pytest.mark.parametrize(
    ("num_images", "budget", "confidence"), [(60, 0.05, 0.9), (300, 0.01, 0.95), (1000, 0.02, 0.8)]
)
def test_the_guarantee_holds_over_many_draws_of_the_calibration_set(num_images, budget, confidence):
    """Good parts' scores ~ Exp(1), so a threshold t lets through exactly exp(-t) of them: over 4000 draws of
    n calibration scores, the realised false-alarm rate exceeds the budget no more often than 1 - confidence
    (up to the Monte Carlo error); one order lower exceeds it more often (the order is the smallest)."""
    rng = np.random.default_rng(0)
    draws = 4000
    exceeded = exceeded_one_lower = 0
    for _ in range(draws):
        scores = torch.from_numpy(rng.exponential(size=num_images))
        result = guarantee(scores, budget, confidence)
        assert result.budget_met
        exceeded += np.exp(-result.threshold) > budget
        exceeded_one_lower += np.exp(-float(scores.sort().values[result.order - 2])) > budget
    slack = 3 * np.sqrt(confidence * (1 - confidence) / draws)  # three Monte Carlo standard errors
    assert exceeded / draws <= (1 - confidence) + slack, exceeded / draws
    # the simulation matches the theory: P(rate > budget) = P(Binomial(n, 1 - budget) >= k) exactly
    theory = 1 - stats.binom.cdf(result.order - 1, num_images, 1 - budget)
    assert exceeded / draws == pytest.approx(theory, abs=slack)
    assert exceeded_one_lower / draws > (1 - confidence) - slack  # k is the smallest order that holds


def test_too_few_images_use_the_best_possible_threshold_and_say_so(caplog):
    scores = torch.arange(1.0, 7.0)  # six normal validation images
    with caplog.at_level(logging.WARNING):
        calibration = fit_calibration(scores, scores, 0.01, 0.01, 0.95, source="held-out split")
    assert calibration.threshold == 6.0 and calibration.order == 6  # the largest score
    assert calibration.guaranteed_rate == pytest.approx(1 - 0.05 ** (1 / 6))  # 39 %
    assert (
        "With 6 normal calibration images the lowest false-alarm rate that can be guaranteed at 95 % is 39 %"
        in caplog.text
    )
    assert "add normal images" in caplog.text.lower()
    # nothing above the threshold on these scores: the rate's upper 95 % bound is 1 - 0.05^(1/6)
    assert calibration.validation_upper_bound == pytest.approx(1 - 0.05 ** (1 / 6))
    assert calibration.normalise(torch.tensor([3.5, 6.0])).tolist() == pytest.approx([0, 1])


def test_order_statistic_and_bounds_by_formula():
    # n = 299 is the smallest n for which the largest score guarantees 1 % at 95 %: 1 - 0.99^299 >= 0.95
    assert guarantee(torch.rand(299), 0.01, 0.95).budget_met
    assert not guarantee(torch.rand(298), 0.01, 0.95).budget_met
    assert guaranteed_rate(299, 299, 0.95) <= 0.01 < guaranteed_rate(298, 298, 0.95)
    assert clopper_pearson_upper(0, 10, 0.95) == pytest.approx(1 - 0.05**0.1)
    assert clopper_pearson_upper(3, 100, 0.95) == pytest.approx(stats.beta.ppf(0.95, 4, 97))


def test_metrics_at_threshold_by_hand():
    scores, labels = torch.tensor([0.1, 0.6, 0.4, 0.9, 0.7, 0.5]), torch.tensor([0, 0, 1, 1, 1, 0])
    metrics = metrics_at_threshold(scores, labels, 0.5)  # above: 0.6 (false alarm), 0.9, 0.7; 0.5 is not
    assert metrics["precision_at_threshold"] == pytest.approx(2 / 3)
    assert metrics["recall_at_threshold"] == pytest.approx(2 / 3)
    assert metrics["false_alarm_rate"] == pytest.approx(1 / 3)


def test_pixel_decisions_by_hand():
    maps = torch.zeros(2, 1, 4, 4)
    masks = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    masks[0, 0, :2, :2] = True  # region A, 4 pixels
    masks[1, 0, 3, 3] = True  # region B, 1 pixel
    maps[0, 0, 0, :2] = 1.0  # 2 of A's pixels above 0.5
    maps[1, 0, 0, 0] = 1.0  # one false positive, B missed
    decisions = pixel_decisions(maps, masks, 0.5)
    assert decisions["pixel_f1_at_threshold"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 3))
    assert decisions["region_overlap_at_threshold"] == pytest.approx((2 / 4 + 0) / 2)
    assert decisions["regions_detected_at_threshold"] == pytest.approx(1 / 2)


def test_drift_fires_on_a_shifted_batch_and_not_on_an_unshifted_one():
    rng = np.random.default_rng(1)
    normal = torch.from_numpy(rng.normal(size=500))
    calibration = fit_calibration(normal, normal, 0.05, 0.05, 0.9, source="held-out split")
    same = drift(torch.from_numpy(rng.normal(size=200)), calibration)
    moved = drift(torch.from_numpy(rng.normal(0.5, 1.0, size=200)), calibration)  # e.g. brighter light
    assert same["drift_p_value"] > 0.05 and moved["drift_p_value"] < 1e-4
    assert moved["share_above_threshold"] > same["share_above_threshold"]


def fitted_padim(backbone, images, seed=0) -> Padim:
    model = Padim(backbone, n_features=12, seed=seed)
    for batch in images.split(6):
        model.collect(batch)
    model.fit()
    return model


def test_padim_cross_fit_by_subtraction_equals_a_refit_per_fold(tiny_backbone, smooth_images):
    images = smooth_images(24, seed=0)
    folds = [lambda part=part: part.split(4) for part in images.chunk(4)]
    model = fitted_padim(tiny_backbone(), images)
    subtracted = model.cross_fit_scores(folds, new_model=None)
    refitted = FitOnceModel.cross_fit_scores(
        model, folds, new_model=lambda: Padim(tiny_backbone(), n_features=12)
    )
    for fast, brute in zip(subtracted, refitted, strict=True):
        torch.testing.assert_close(fast, brute, rtol=1e-4, atol=1e-4)
    # and they are held-out scores: higher than the scores of the images the model was fitted on
    assert subtracted[0].mean() > model(images).image_score.mean()


def test_padim_update_equals_a_refit_on_all_images(tiny_backbone, smooth_images):
    old, new = smooth_images(12, seed=0), smooth_images(9, seed=1)
    updated = fitted_padim(tiny_backbone(), old)
    updated.update(new.split(4))
    refit = fitted_padim(tiny_backbone(), torch.cat([old, new]))
    assert int(updated.count) == 21
    torch.testing.assert_close(updated.mean, refit.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(updated.covariance, refit.covariance, rtol=1e-4, atol=1e-6)
    probe = smooth_images(3, seed=2)
    torch.testing.assert_close(updated(probe).anomaly_map, refit(probe).anomaly_map, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_threshold_depends_on_normal_images_only(tmp_path, run_training):
    """Runs whose test sets differ (other defects, other counts) get the same thresholds, from the held-out
    split and from a cross-fit alike: fails if test data leaks into calibration."""
    cross_fit = ["dataset.calibration_fraction=0", "threshold.source=cross_fit"]
    for source in (["dataset.calibration_fraction=0.25"], cross_fit):
        # 64 px: the thresholds' independence from the test set does not need the small data's 128
        common = ["method=padim", "logger=none", "dataset.image_size=64", *source,
                  "threshold.false_alarm_rate=0.1"]  # fmt: skip
        name = source[-1].split("=")[-1]
        first, first_dir = run_training(tmp_path / f"a-{name}", [*common, "dataset.n_test_defect=12"])
        second, _ = run_training(
            tmp_path / f"b-{name}", [*common, "dataset.n_test_defect=4", "dataset.n_test_good=2"]
        )
        assert first["threshold"] == pytest.approx(second["threshold"], rel=1e-6)
        assert first["pixel_threshold"] == pytest.approx(second["pixel_threshold"], rel=1e-6)
        assert first["image_f1_threshold"] != pytest.approx(second["image_f1_threshold"], rel=1e-3)
        loaded = load_model(first_dir)
        assert loaded.calibration.threshold == pytest.approx(first["threshold"])
        assert loaded.calibration.num_images == (4 if "0.25" in source[0] else 16)  # held-out, or all 16
        assert 0.0 <= first["false_alarm_rate"] <= 1.0 and "f1_at_threshold" in first
        assert "regions_detected_at_threshold" in first and "good_false_positive_area" in first


def test_choose_source_takes_the_calibration_images_else_a_cross_fit_and_names_what_is_missing():
    origin = "the data set's own held-out normal images (juice_bottle)"
    assert choose_source("auto", origin, True, 20, 5) == CalibrationSource("calibration_images", origin)
    cross_fit = choose_source("auto", None, True, 3, 5)
    assert cross_fit.kind == "cross_fit" and "3 training images (3 folds)" in cross_fit.description
    none = choose_source("auto", None, False, 20, 5)  # a trained method without any: no threshold, and why
    assert none.kind == "none" and "dataset.calibration_fraction > 0" in none.description
    assert choose_source("none", origin, True, 20, 5) == CalibrationSource("none", "threshold.source=none")
    with pytest.raises(ConfigError, match=r"dataset\.calibration_dir"):
        choose_source("calibration_images", None, True, 20, 5)
    with pytest.raises(ConfigError, match="fit-once"):
        choose_source("cross_fit", origin, False, 20, 5)
    with pytest.raises(ConfigError, match="auto, calibration_images, cross_fit, none"):
        choose_source("validation", origin, True, 20, 5)
    with pytest.raises(ConfigError, match="not with 1 training image"):
        choose_source("cross_fit", None, True, 1, 5)


def test_a_few_shot_run_cross_fits_only_when_k_reaches_the_folds_and_says_why_not():
    """k < folds: each fold model would fit on too few of the k images to stand for the fitted one; the
    un-drawn training images are never taken, the test set never."""
    origin = "dataset.calibration_dir (/good)"
    assert choose_source("auto", origin, True, 2, 5, few_shot=True).kind == "calibration_images"
    assert choose_source("auto", None, True, 8, 5, few_shot=True).description.startswith(
        "cross-fit over the 8"
    )
    for fits_once, k, augmented in ((True, 4, False), (True, 8, True), (False, 16, False)):
        none = choose_source("auto", None, fits_once, k, 5, few_shot=True, augmented=augmented)
        assert none.kind == "none" and f"besides its k={k}" in none.description
        assert "dataset.shot_calibration=<n>" in none.description
    assert "threshold.folds=5" in choose_source("auto", None, True, 4, 5, few_shot=True).description
    assert choose_source("cross_fit", None, True, 2, 5, few_shot=True).kind == "cross_fit"  # asked for: done
    with pytest.raises(ConfigError, match="shot_augment=true"):
        choose_source("cross_fit", None, True, 8, 5, few_shot=True, augmented=True)


def test_describe_states_the_guarantee_and_an_unmet_budget():
    met = fit_calibration(torch.linspace(0, 1, 400), torch.linspace(0, 1, 400), 0.01, 0.01, 0.95, "folder")
    assert "from 400 normal images (folder)" in met.describe() and "needs more" not in met.describe()
    unmet = fit_calibration(torch.linspace(0, 1, 6), torch.linspace(0, 1, 6), 0.01, 0.01, 0.95, "folder")
    assert "39.3 % false alarms" in unmet.describe()
    assert "budget of 1 % needs more normal images" in unmet.describe()
