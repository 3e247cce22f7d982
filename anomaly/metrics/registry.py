"""Every metric a test run returns, described once: its key in metrics.json and how the reports show it.

To add a metric, add its :class:`Metric` to :data:`METRICS` and compute it in
:meth:`anomaly.metrics.evaluator.Evaluator.compute` under that key: results.csv, the sweep and
``anomaly-report`` tables (beside the papers' numbers of ``anomaly/reports/paper_results.yaml``), the plots,
report.html and the wandb summary all read this tuple, and tests/unit/test_metric_registry.py checks that
every key the Evaluator returns is in it. The list is explicit on purpose: nothing is found by scanning.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    key: str  # as in metrics.json, run.json, results.csv and the Lightning/wandb logs (test/<key>)
    label: str  # short, for table headings and plot axes
    higher_is_better: bool | None  # None: not a quality but a threshold or a bound on another metric's error
    pixel: bool  # from anomaly maps and masks: only with masks and evaluation's pixel metrics on
    percent: bool  # a share in [0, 1], shown ×100 (the papers' tables are in percent too)
    reported: bool = False  # a results.csv column, a table and a plot in every report; else metrics.json only


METRICS: tuple[Metric, ...] = (
    Metric("image_auroc", "image AUROC", True, pixel=False, percent=True, reported=True),
    Metric("pixel_auroc", "pixel AUROC", True, pixel=True, percent=True, reported=True),
    Metric("pixel_aupro", "AU-PRO", True, pixel=True, percent=True, reported=True),
    Metric("image_f1_max", "image F1-max", True, pixel=False, percent=True, reported=True),
    Metric("image_f1_threshold", "F1-max threshold", None, pixel=False, percent=False),
    # per physical part, where test images are views of one part (Real-IAD; anomaly.metrics.per_sample)
    Metric("sample_auroc", "sample AUROC", True, pixel=False, percent=True, reported=True),
    Metric("sample_aupr", "sample AUPR", True, pixel=False, percent=True),
    # with a calibrated image threshold (anomaly.calibration.metrics_at_threshold)
    Metric("threshold", "image threshold", None, pixel=False, percent=False),
    Metric("precision_at_threshold", "precision", True, pixel=False, percent=True),
    Metric("recall_at_threshold", "recall", True, pixel=False, percent=True),
    Metric("f1_at_threshold", "F1", True, pixel=False, percent=True),
    Metric("false_alarm_rate", "false-alarm rate", False, pixel=False, percent=True),
    # pixel metrics from a histogram, beyond evaluation.exact_pixel_limit (anomaly.metrics.histogram)
    Metric("pixel_auroc_max_error", "pixel AUROC error bound", None, pixel=True, percent=True),
    Metric("pixel_aupro_max_error", "AU-PRO error bound", None, pixel=True, percent=True),
    # with a calibrated pixel threshold (anomaly.metrics.aupro.pixel_decisions)
    Metric("pixel_threshold", "pixel threshold", None, pixel=True, percent=False),
    Metric("pixel_f1_at_threshold", "pixel F1", True, pixel=True, percent=True),
    Metric("region_overlap_at_threshold", "region overlap", True, pixel=True, percent=True),
    Metric("regions_detected_at_threshold", "regions detected", True, pixel=True, percent=True),
    Metric("good_false_positive_area", "false-positive area of good images", False, pixel=True, percent=True),
    Metric("good_images_with_false_positive_pixels", "good images with false-positive pixels", False,
           pixel=True, percent=True),
)  # fmt: skip


def reported_metrics() -> tuple[Metric, ...]:
    """The metrics every report shows, in :data:`METRICS`' order (read when called, so that the tuple is
    the one source even for a metric added at run time, as the tests do)."""
    return tuple(metric for metric in METRICS if metric.reported)
