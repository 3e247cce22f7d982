"""Decision threshold and score normalisation, fitted on normal validation images only.

The test set is never used here. With ``quantile = 0.99`` about 1 % of good parts like those in the
validation split raise a false alarm. The normalised score is 0 for a typical good part and 1 at the
threshold, so scores of different methods and runs share one scale.
"""

from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor

from anomaly.errors import ConfigError


@dataclass(frozen=True)
class Calibration:
    threshold: float  # image scores (and map values) at or above it are anomalous
    normal_median: float  # median image score of the normal validation images
    quantile: float  # the quantile of normal validation scores that gave the threshold
    num_images: int  # how many normal validation images it was fitted on

    def normalise(self, scores: Tensor) -> Tensor:
        """0 = a typical good part, 1 = at the threshold (same formula for image scores and maps)."""
        return (scores - self.normal_median) / max(self.threshold - self.normal_median, 1e-12)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: object) -> "Calibration | None":
        """The calibration :meth:`to_dict` wrote (None stays None); anything else is a ConfigError."""
        if values is None:
            return None
        names = {field.name for field in fields(cls)}
        if not isinstance(values, dict) or set(values) != names:
            raise ConfigError(f"calibration must have exactly the keys {sorted(names)}, got {values!r}")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values.values()):
            raise ConfigError(f"calibration values must be numbers, got {values!r}")
        return cls(**values)


def fit_calibration(normal_scores: Tensor, quantile: float) -> Calibration:
    """Threshold = the ``quantile`` of image scores of normal validation images ``[N]``."""
    if normal_scores.numel() < 2:
        raise ValueError(
            f"calibration needs at least 2 normal validation images, got {normal_scores.numel()}: "
            "raise dataset.val_fraction"
        )
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"threshold quantile must be in (0, 1), got {quantile}")
    scores = normal_scores.double()
    return Calibration(
        threshold=float(torch.quantile(scores, quantile)),
        normal_median=float(torch.quantile(scores, 0.5)),
        quantile=quantile,
        num_images=scores.numel(),
    )


def metrics_at_threshold(scores: Tensor, labels: Tensor, threshold: float) -> dict[str, float]:
    """Precision, recall, F1 and false-alarm rate of the decision ``score >= threshold``."""
    predicted, labels = scores >= threshold, labels.bool()
    true_positives = float((predicted & labels).sum())
    precision = true_positives / max(float(predicted.sum()), 1.0)
    recall = true_positives / max(float(labels.sum()), 1.0)
    return {
        "threshold": threshold,
        "precision_at_threshold": precision,
        "recall_at_threshold": recall,
        "f1_at_threshold": 2 * precision * recall / max(precision + recall, 1e-12),
        "false_alarm_rate": float((predicted & ~labels).sum()) / max(float((~labels).sum()), 1.0),
    }
