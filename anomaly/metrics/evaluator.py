"""Test-set metrics: image AUROC and F1-max, pixel AUROC and AUPRO, accumulated batch by batch."""

import torch
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc, binary_precision_recall_curve

from anomaly.calibration import metrics_at_threshold
from anomaly.errors import ConfigError
from anomaly.metrics.aupro import pixel_auroc_and_aupro, pixel_decisions


class Evaluator:
    """Collects a test set batch by batch; :meth:`compute` gives all metrics at the end.

    Maps are held as float32 on CPU and masks as bool, so a large test set is stored once, compactly.
    Pixel metrics are computed only when ``compute_pixel_metrics`` is on and masks were given.
    """

    def __init__(self, compute_pixel_metrics: bool = True, aupro_fpr_limit: float = 0.3) -> None:
        if not 0 < aupro_fpr_limit <= 1:
            raise ConfigError(f"the AUPRO false-positive-rate limit must be in (0, 1], got {aupro_fpr_limit}")
        self.compute_pixel_metrics = compute_pixel_metrics
        self.aupro_fpr_limit = aupro_fpr_limit
        self.reset()

    def reset(self) -> None:
        """Forgets every batch collected so far."""
        self._scores: list[Tensor] = []
        self._labels: list[Tensor] = []
        self._maps: list[Tensor] = []
        self._masks: list[Tensor] = []

    def update(
        self,
        image_scores: Tensor,
        labels: Tensor,
        anomaly_maps: Tensor | None = None,
        masks: Tensor | None = None,
    ) -> None:
        """Adds one batch.

        ``image_scores`` ``[B]`` float, ``labels`` ``[B]`` (0 good, 1 defective); for pixel metrics
        ``anomaly_maps`` ``[B, 1, H, W]`` float and ``masks`` ``[B, 1, H, W]`` 0/1. Masks must be given
        for every batch or for none, else pixel metrics would cover only part of the test set.
        """
        if image_scores.ndim != 1 or image_scores.shape != labels.shape:
            raise ValueError(
                f"expected image_scores and labels of shape [B], got {tuple(image_scores.shape)}"
                f" and {tuple(labels.shape)}"
            )
        with_pixels = self.compute_pixel_metrics and masks is not None
        if self._scores and with_pixels != bool(self._masks):
            raise ValueError("masks were given for some batches but not for others")
        if with_pixels:
            _check_pixel_batch(anomaly_maps, masks, len(image_scores))
            self._maps.append(anomaly_maps.detach().to("cpu", torch.float32))
            self._masks.append(masks.detach().to("cpu", torch.bool))
        self._scores.append(image_scores.detach().to("cpu", torch.float32))
        self._labels.append(labels.detach().to("cpu", torch.bool))

    def compute(
        self, threshold: float | None = None, pixel_threshold: float | None = None
    ) -> dict[str, float]:
        """Metrics over everything collected.

        Keys: ``image_auroc``, ``image_f1_max``, ``image_f1_threshold`` and, with pixel metrics,
        ``pixel_auroc`` (over all pixels of all images) and ``pixel_aupro`` (up to ``aupro_fpr_limit``);
        with a ``threshold`` (calibrated on normal images, never on this set) also precision, recall, F1
        and false-alarm rate at it; with a ``pixel_threshold`` the quality of the masks ``map >
        pixel_threshold``: :func:`pixel_decisions`, and on the good images the share with any pixel
        above it and the mean share of their pixels above it. Raises ``ValueError`` when a metric is
        undefined, e.g. when the test set holds only one class.
        """
        if not self._scores:
            raise ValueError("no batch to evaluate: update() was never called")
        scores, labels = _merge(self._scores), _merge(self._labels)
        _require_both_classes(labels, "image metrics", "images")
        f1, best = f1_max(scores, labels)
        metrics = {"image_auroc": _auroc(scores, labels), "image_f1_max": f1, "image_f1_threshold": best}
        if threshold is not None:
            metrics.update(metrics_at_threshold(scores, labels, threshold))
        if self._masks:
            maps, masks = _merge(self._maps), _merge(self._masks)
            _require_both_classes(masks, "pixel metrics", "pixels")
            metrics["pixel_auroc"], metrics["pixel_aupro"] = pixel_auroc_and_aupro(
                maps, masks, self.aupro_fpr_limit
            )
            if pixel_threshold is not None:
                metrics["pixel_threshold"] = pixel_threshold
                metrics.update(pixel_decisions(maps, masks, pixel_threshold))
        if pixel_threshold is not None and self._maps:
            above = _merge(self._maps)[~labels].flatten(1) > pixel_threshold  # [good images, pixels]
            metrics["good_images_with_false_positive_pixels"] = float(above.any(dim=1).double().mean())
            metrics["good_false_positive_area"] = float(above.double().mean())
        return metrics


def f1_max(scores: Tensor, labels: Tensor) -> tuple[float, float]:
    """Best F1 over all thresholds, and that threshold (defective iff score >= threshold).

    ``scores`` ``[N]`` float, ``labels`` ``[N]`` 0/1 with at least one defective sample.
    """
    scores, labels = scores.detach().cpu().reshape(-1), labels.detach().cpu().reshape(-1).bool()
    if not labels.any():
        raise ValueError(f"F1 needs at least one defective sample, got {len(labels)} good ones only")
    unit_scores = _to_unit_interval(scores)
    precision, recall, thresholds = binary_precision_recall_curve(unit_scores, labels, thresholds=None)
    # The curve's last point (precision 1, recall 0) has no threshold.
    f1 = (2 * precision * recall / (precision + recall)).nan_to_num(0.0)[:-1]
    best = int(f1.argmax())
    threshold = scores[unit_scores == thresholds[best]][0]
    return float(f1[best]), float(threshold)


def _auroc(scores: Tensor, labels: Tensor) -> float:
    """Exact AUROC of scores against bool labels of the same shape (any shape)."""
    # Inputs are known valid (float scores, bool labels): skip torchmetrics' extra pass over them.
    auroc = binary_auroc(_to_unit_interval(scores.reshape(-1)), labels.reshape(-1), validate_args=False)
    return float(auroc)


def _to_unit_interval(scores: Tensor) -> Tensor:
    """Maps ``[N]`` scores affinely onto [0, 1] in float64 (a new tensor).

    torchmetrics treats scores outside [0, 1] as logits and applies a sigmoid, which saturates
    (in float32 every score above ~17 becomes 1.0) and so turns distinct scores into ties. An
    increasing affine map in float64 keeps the order and keeps distinct float32 scores distinct.
    """
    unit = scores.to(torch.float64, copy=True)
    low, high = unit.min(), unit.max()
    if not (torch.isfinite(low) and torch.isfinite(high)):
        raise ValueError("scores contain NaN or infinity")
    unit.sub_(low)  # the largest becomes high - low exactly, so it maps to exactly 1
    return unit.div_(high - low) if high > low else unit


def _merge(batches: list[Tensor]) -> Tensor:
    """Concatenates the batches and replaces them by the result, so they are held only once."""
    merged = batches[0] if len(batches) == 1 else torch.cat(batches)
    batches[:] = [merged]
    return merged


def _require_both_classes(labels: Tensor, metrics: str, items: str) -> None:
    num_defective = int(labels.sum())
    num_good = labels.numel() - num_defective
    if num_good == 0 or num_defective == 0:
        raise ValueError(
            f"{metrics} need both classes, got {num_good} good, {num_defective} defective {items}"
        )


def _check_pixel_batch(anomaly_maps: Tensor | None, masks: Tensor, batch_size: int) -> None:
    if anomaly_maps is None:
        raise ValueError("masks were given without anomaly_maps")
    if (
        anomaly_maps.ndim != 4
        or anomaly_maps.shape[:2] != (batch_size, 1)
        or masks.shape != anomaly_maps.shape
    ):
        raise ValueError(
            f"expected anomaly_maps and masks of shape [{batch_size}, 1, H, W], got"
            f" {tuple(anomaly_maps.shape)} and {tuple(masks.shape)}"
        )
