"""Evaluation metrics: image AUROC and F1-max, pixel AUROC and AUPRO, and their one registry."""

from anomaly.metrics.aupro import aupro
from anomaly.metrics.evaluator import CategoryEvaluators, Evaluator, f1_max, mean_over_categories
from anomaly.metrics.registry import METRICS, Metric, reported_metrics

__all__ = [
    "METRICS",
    "CategoryEvaluators",
    "Evaluator",
    "Metric",
    "aupro",
    "f1_max",
    "mean_over_categories",
    "reported_metrics",
]
