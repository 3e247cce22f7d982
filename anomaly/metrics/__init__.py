"""Evaluation metrics: image AUROC and F1-max, pixel AUROC and AUPRO, and their one registry."""

from anomaly.metrics.aupro import aupro
from anomaly.metrics.evaluator import Evaluator, f1_max
from anomaly.metrics.registry import METRICS, Metric, reported_metrics

__all__ = ["METRICS", "Evaluator", "Metric", "aupro", "f1_max", "reported_metrics"]
