"""Binned pixel metrics (anomaly/metrics/histogram.py) against the exact ones: within the error bound they
report, within 1e-4 at the default number of bins, on a grid that only the data's range decides, in memory
that does not grow with the test set; the Evaluator switches to them above its pixel limit."""

import math

import pytest
import torch

from anomaly.errors import ConfigError
from anomaly.metrics import Evaluator
from anomaly.metrics.aupro import label_regions
from anomaly.metrics.histogram import PixelHistogram

SIZE = 32
PIXEL_KEYS = ["pixel_auroc", "pixel_aupro"]
# at a pixel threshold: regions detected and good images with a pixel above it are exact (maxima),
# the others interpolated inside the threshold's bin
EXACT_DECISIONS = ["regions_detected_at_threshold", "good_images_with_false_positive_pixels"]
BINNED_DECISIONS = ["pixel_f1_at_threshold", "region_overlap_at_threshold", "good_false_positive_area"]


def defect_maps(seed: int, num_images: int = 9) -> tuple[torch.Tensor, ...]:
    """Image scores ``[N]``, labels ``[N]``, maps ``[N, 1, 32, 32]`` and masks; the last three images good.

    Maps are uniform noise with a constant band (rows 0-5, 0.25 everywhere: a tie across images and
    classes, as one region lies in it) and a band quantised to 1/8 (ties); each defective image has two
    rectangles scoring higher by an amount of its own.
    """
    generator = torch.Generator().manual_seed(seed)
    maps = torch.rand(num_images, 1, SIZE, SIZE, generator=generator)
    maps[:, :, :6] = 0.25
    maps[:, :, 6:12] = (maps[:, :, 6:12] * 8).round() / 8
    masks = torch.zeros_like(maps, dtype=torch.bool)
    for image in range(num_images - 3):
        for _ in range(2):
            row, col = torch.randint(0, SIZE - 8, (2,), generator=generator).tolist()
            height, width = torch.randint(1, 9, (2,), generator=generator).tolist()
            masks[image, 0, row : row + height, col : col + width] = True
    maps += 0.6 * torch.rand(num_images, 1, 1, 1, generator=generator) * masks
    masks[0, 0, 0:2, 0:3] = True  # a region inside the constant band, tied with its good pixels
    labels = masks.flatten(1).any(dim=1)
    return maps.flatten(1).amax(dim=1), labels, maps, masks


def evaluate(data: tuple[torch.Tensor, ...], batch_size: int = 4, **settings) -> dict[str, float]:
    evaluator = Evaluator(**settings)
    for start in range(0, len(data[0]), batch_size):
        evaluator.update(*(tensor[start : start + batch_size] for tensor in data))
    return evaluator.compute(threshold=0.9, pixel_threshold=0.7)


@pytest.mark.parametrize(("seed", "fpr_limit"), [(0, 0.3), (1, 0.05), (2, 1.0)])
def test_binned_pixel_metrics_are_within_1e_4_of_the_exact_ones(seed: int, fpr_limit: float) -> None:
    data = defect_maps(seed)
    exact = evaluate(data, aupro_fpr_limit=fpr_limit)
    binned = evaluate(data, aupro_fpr_limit=fpr_limit, exact_pixel_limit=0)  # 2^20 bins
    assert "pixel_auroc_max_error" not in exact
    for key in PIXEL_KEYS:
        error = abs(binned[key] - exact[key])
        assert error <= 1e-4, key
        assert error <= binned[f"{key}_max_error"] + 1e-12, key
        assert binned[f"{key}_max_error"] <= 1e-4, key
    image_keys = evaluate(data, compute_pixel_metrics=False).keys()  # image metrics are never binned
    for key in [*EXACT_DECISIONS, *image_keys]:
        assert binned[key] == exact[key], key
    for key in BINNED_DECISIONS:
        assert binned[key] == pytest.approx(exact[key], abs=1e-4), key


@pytest.mark.parametrize("num_bins", [4, 16, 256])
def test_the_reported_bound_holds_on_coarse_grids(num_bins: int) -> None:
    data = defect_maps(3)
    exact, binned = evaluate(data), evaluate(data, exact_pixel_limit=0, histogram_bins=num_bins)
    for key in PIXEL_KEYS:
        error = abs(binned[key] - exact[key])
        assert error <= binned[f"{key}_max_error"] + 1e-12, (key, error, binned[f"{key}_max_error"])
    assert abs(binned["pixel_auroc"] - exact["pixel_auroc"]) > 1e-5  # coarse enough to be off at all


def test_an_outlier_coarsens_the_grid_and_the_bound_says_so() -> None:
    scores, labels, maps, masks = defect_maps(4)
    maps[-1, 0, -1, -1] = 1e4  # one good pixel far above the rest: every other value shares a few bins
    data = (scores, labels, maps, masks)
    exact, binned = evaluate(data), evaluate(data, exact_pixel_limit=0, histogram_bins=1024)
    assert binned["pixel_auroc_max_error"] > 1e-2
    assert abs(binned["pixel_auroc"] - exact["pixel_auroc"]) <= binned["pixel_auroc_max_error"]


def test_counts_above_a_threshold_inside_a_bin_are_interpolated() -> None:
    values = torch.arange(1024.0).reshape(1, 1, 32, 32) / 1024  # 64 distinct values in each of 16 bins
    histogram = PixelHistogram(16)
    masks = values > 0.9
    histogram.add(values, masks, torch.tensor([True]))
    assert 2.0**histogram.exponent == 1 / 16
    for threshold in (0.53, 0.5 + 63 / 1024, 0.2):  # inside a bin, at its largest value, below all
        share = histogram.decisions(threshold)["good_false_positive_area"]
        assert share == pytest.approx(float((values > threshold).double().mean()), abs=1 / 1024)
    assert histogram.decisions(0.95)["regions_detected_at_threshold"] == 1.0  # from the region's maximum


def test_ties_are_exact_and_cost_nothing_in_the_bound() -> None:
    scores, labels, maps, masks = defect_maps(5)
    maps = (maps * 16).round() / 16 - 0.5  # 27 distinct values, negative ones too: one per bin
    data = (scores, labels, maps, masks)
    exact, binned = evaluate(data), evaluate(data, exact_pixel_limit=0, histogram_bins=64)
    for key in PIXEL_KEYS:
        assert binned[key] == pytest.approx(exact[key], abs=1e-12), key
        assert binned[f"{key}_max_error"] == 0.0
    for key in BINNED_DECISIONS:  # the threshold lies between distinct values: nothing to interpolate
        assert binned[key] == pytest.approx(exact[key], abs=1e-12), key


def test_the_grid_depends_only_on_the_values_not_on_their_order() -> None:
    """Batches in two orders, and all at once, give the same histogram, though a late batch (x 1000,
    negative) widens the range many times."""
    _, labels, maps, masks = defect_maps(6)
    maps[6:] = -1000 * maps[6:]
    batches = [(maps[i : i + 3], masks[i : i + 3], ~labels[i : i + 3]) for i in range(0, 9, 3)]
    histograms = [PixelHistogram(4096) for _ in range(3)]
    for batch in batches:
        histograms[0].add(*batch)
    for batch in reversed(batches):
        histograms[1].add(*batch)
    histograms[2].add(maps, masks, ~labels)
    first = histograms[0]
    for other in histograms[1:]:
        assert (other.exponent, other.offset, other.low, other.high) == (
            first.exponent, first.offset, first.low, first.high,
        )  # fmt: skip
        assert torch.equal(other.counts, first.counts)
        assert torch.equal(other.value_range, first.value_range)
        torch.testing.assert_close(other.pro_mass, first.pro_mass, rtol=1e-12, atol=0)
    width, span = 2.0**first.exponent, first.high - first.low
    assert span < 4096 * width and 4095 * width < 2 * span  # the finest grid that holds the range


def test_the_state_does_not_grow_with_the_number_of_images() -> None:
    _, labels, maps, masks = defect_maps(7)
    histogram = PixelHistogram(2048)
    histogram.add(maps, masks, ~labels)
    sizes = [tensor.numel() for tensor in (histogram.counts, histogram.pro_mass, histogram.value_range)]
    for _ in range(20):  # 20 times more images (the same ones)
        histogram.add(maps, masks, ~labels)
    assert [t.numel() for t in (histogram.counts, histogram.pro_mass, histogram.value_range)] == sizes
    assert int(histogram.counts.sum()) == 21 * maps.numel()
    # per defect region one maximum is kept: the only state that grows, and with regions, not pixels
    assert sum(len(maxima) for maxima in histogram.region_maxima) == 21 * label_regions(masks[:, 0])[1]


def test_the_evaluator_is_exact_up_to_its_pixel_limit_and_binned_above() -> None:
    data = defect_maps(8)
    num_pixels = data[2].numel()
    at_limit = evaluate(data, batch_size=2, exact_pixel_limit=num_pixels)
    above = evaluate(data, batch_size=2, exact_pixel_limit=num_pixels - 1)  # passed by the last batch
    early = evaluate(data, batch_size=2, exact_pixel_limit=2 * SIZE * SIZE)  # passed by the second batch
    assert at_limit == evaluate(data)
    assert "pixel_auroc_max_error" in above
    assert above == pytest.approx(early, abs=1e-12)  # the maps held until the switch count like later ones


def test_binned_metrics_reject_non_finite_maps_and_single_class_pixels() -> None:
    scores, labels, maps, masks = defect_maps(9)
    for bad in (math.nan, math.inf):
        broken = maps.clone()
        broken[0, 0, 5, 5] = bad
        with pytest.raises(ValueError, match="NaN or infinity"):
            evaluate((scores, labels, broken, masks), exact_pixel_limit=0)
    with pytest.raises(ValueError, match="pixel metrics need both classes"):
        evaluate((scores, labels, maps, torch.zeros_like(masks)), exact_pixel_limit=0)


@pytest.mark.parametrize(("setting", "value"), [("exact_pixel_limit", -1), ("histogram_bins", 1)])
def test_evaluator_rejects_bad_binning_settings(setting: str, value: int) -> None:
    with pytest.raises(ConfigError):
        Evaluator(**{setting: value})
