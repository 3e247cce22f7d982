"""Evaluation metrics: image AUROC and F1-max, pixel AUROC and AUPRO."""

from anomaly.metrics.aupro import aupro
from anomaly.metrics.evaluator import Evaluator, f1_max

__all__ = ["Evaluator", "aupro", "f1_max"]
