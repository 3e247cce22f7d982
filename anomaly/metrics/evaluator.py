"""Test-set metrics: image AUROC and F1-max, pixel AUROC and AUPRO, per-sample AUROC and AUPR where images
show parts from several views, accumulated batch by batch, all ranks."""

import logging
from collections.abc import Sequence
from statistics import mean

import torch
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_precision_recall_curve,
)

from anomaly.calibration import metrics_at_threshold
from anomaly.distributed import LOCAL, Collective
from anomaly.errors import ConfigError, UndefinedMetricError
from anomaly.metrics.aupro import pixel_auroc_and_aupro, pixel_decisions
from anomaly.metrics.histogram import DEFAULT_BINS, PixelHistogram
from anomaly.metrics.per_sample import per_sample

log = logging.getLogger(__name__)

DEFAULT_EXACT_PIXEL_LIMIT = 100_000_000


class Evaluator:
    """Collects a test set batch by batch; :meth:`compute` gives all metrics at the end.

    Image metrics are always exact. Pixel metrics are computed only when ``compute_pixel_metrics`` is on
    and masks were given; they are exact while the test set has at most ``exact_pixel_limit`` map pixels
    (100 M by default, ~1,500 maps of 256 x 256): maps are held as float32 on CPU and masks as bool, 5 bytes
    a pixel, and sorting them at the end takes ~50 bytes a pixel more (~5 GB at the limit). Beyond it the
    maps are counted into a :class:`~anomaly.metrics.histogram.PixelHistogram` of ``histogram_bins`` bins
    instead (48 MB by default, and 4 bytes a defect region), and the pixel metrics come with a bound on
    their error, ``pixel_auroc_max_error`` and ``pixel_aupro_max_error`` (:mod:`anomaly.metrics.histogram`).

    ``part_ids`` ``[N]`` int: the physical part each test image shows, by its position in the test set
    (Real-IAD: the five views of a part share one; :func:`anomaly.data.samples.part_numbers`). With them,
    :meth:`update` takes each batch's positions (``indices``) and :meth:`compute` adds the per-sample
    metrics ``sample_auroc`` and ``sample_aupr`` (:mod:`anomaly.metrics.per_sample`: a part's score is the
    maximum over its views, and it is defective when any view is).

    With several processes each rank updates with its block of the test set and :meth:`compute`, given
    the run's :class:`~anomaly.distributed.Collective`, returns the metrics of the whole set on every rank,
    the same as one process: the exact path gathers scores, maps and masks in rank order, the histogram
    path sums the ranks' counts on one grid (AUPRO's float64 sums may then differ from one process's in
    the last bits).
    """

    def __init__(
        self,
        compute_pixel_metrics: bool = True,
        aupro_fpr_limit: float = 0.3,
        exact_pixel_limit: int = DEFAULT_EXACT_PIXEL_LIMIT,
        histogram_bins: int = DEFAULT_BINS,
        part_ids: Tensor | None = None,
    ) -> None:
        if not 0 < aupro_fpr_limit <= 1:
            raise ConfigError(f"the AUPRO false-positive-rate limit must be in (0, 1], got {aupro_fpr_limit}")
        if exact_pixel_limit < 0:
            raise ConfigError(f"the exact pixel limit must be >= 0 (0: always bin), got {exact_pixel_limit}")
        if histogram_bins < 2:
            raise ConfigError(f"a pixel histogram needs at least 2 bins, got {histogram_bins}")
        self.compute_pixel_metrics = compute_pixel_metrics
        self.aupro_fpr_limit = aupro_fpr_limit
        self.exact_pixel_limit = exact_pixel_limit
        self.histogram_bins = histogram_bins
        self.part_ids = None if part_ids is None else part_ids.detach().to("cpu", torch.int64)
        self.reset()

    def reset(self) -> None:
        """Forgets every batch collected so far."""
        self._scores: list[Tensor] = []
        self._labels: list[Tensor] = []
        self._indices: list[Tensor] = []  # [B] per batch: the images' positions in the test set
        self._with_pixels: bool | None = None  # known from the first batch on
        self._num_pixels = 0
        self._map_maxima: list[Tensor] = []  # [B] per batch: has a good image any pixel above a threshold?
        self._maps: list[Tensor] = []  # exact path: [B, 1, H, W] per batch
        self._masks: list[Tensor] = []
        self._histogram: PixelHistogram | None = None  # instead of maps and masks beyond exact_pixel_limit

    def update(
        self,
        image_scores: Tensor,
        labels: Tensor,
        anomaly_maps: Tensor | None = None,
        masks: Tensor | None = None,
        indices: Tensor | None = None,
    ) -> None:
        """Adds one batch.

        ``image_scores`` ``[B]`` float, ``labels`` ``[B]`` (0 good, 1 defective); for pixel metrics
        ``anomaly_maps`` ``[B, 1, H, W]`` float and ``masks`` ``[B, 1, H, W]`` 0/1. Masks must be given
        for every batch or for none, else pixel metrics would cover only part of the test set. ``indices``
        ``[B]`` int: the images' positions in the test set (the batch's ``"index"``), needed with
        ``part_ids``.
        """
        if image_scores.ndim != 1 or image_scores.shape != labels.shape:
            raise ValueError(
                f"expected image_scores and labels of shape [B], got {tuple(image_scores.shape)}"
                f" and {tuple(labels.shape)}"
            )
        with_pixels = self.compute_pixel_metrics and masks is not None
        if self._with_pixels not in (None, with_pixels):
            raise ValueError("masks were given for some batches but not for others")
        if self.part_ids is not None:
            if indices is None or indices.shape != image_scores.shape:
                raise ValueError("with part_ids, every batch needs the test-set positions [B] of its images")
            self._indices.append(indices.detach().to("cpu", torch.int64))
        self._with_pixels = with_pixels
        labels = labels.detach().to("cpu", torch.bool)
        if with_pixels:
            _check_pixel_batch(anomaly_maps, masks, len(image_scores))
            anomaly_maps = anomaly_maps.detach().to("cpu", torch.float32)
            masks = masks.detach().to("cpu", torch.bool)
            self._map_maxima.append(anomaly_maps.amax(dim=(1, 2, 3)))
            self._num_pixels += anomaly_maps.numel()
            if self._histogram is None:
                self._maps.append(anomaly_maps)
                self._masks.append(masks)
            else:
                self._histogram.add(anomaly_maps, masks, ~labels)
        self._scores.append(image_scores.detach().to("cpu", torch.float32))
        self._labels.append(labels)
        if self._histogram is None and self._num_pixels > self.exact_pixel_limit:
            self._count_into_histogram()

    @property
    def num_pixels(self) -> int:
        """Map pixels collected so far on this rank."""
        return self._num_pixels

    def count_into_histogram(self) -> None:
        """Pixel metrics from the histogram from now on, as with ``exact_pixel_limit=0``: the maps held so
        far are counted into it (:class:`CategoryEvaluators`, whose categories share one pixel budget)."""
        self.exact_pixel_limit = 0
        if self._histogram is None and self._maps:
            self._count_into_histogram()

    def _count_into_histogram(self) -> None:
        """Moves the maps and masks held so far into a histogram, which counts every later batch too."""
        self._histogram, start = PixelHistogram(self.histogram_bins), 0
        for anomaly_maps, masks in zip(self._maps, self._masks, strict=True):
            good = ~_merge(self._labels)[start : start + len(anomaly_maps)]  # each map has its label
            self._histogram.add(anomaly_maps, masks, good)
            start += len(anomaly_maps)
        self._maps, self._masks = [], []

    def compute(
        self,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        collective: Collective = LOCAL,
    ) -> dict[str, float]:
        """Metrics over everything collected, by every rank of ``collective``, which each rank must call.

        Keys: ``image_auroc``, ``image_f1_max``, ``image_f1_threshold`` and, with pixel metrics,
        ``pixel_auroc`` (over all pixels of all images) and ``pixel_aupro`` (up to ``aupro_fpr_limit``),
        beyond ``exact_pixel_limit`` pixels with ``pixel_auroc_max_error`` and ``pixel_aupro_max_error``;
        with ``part_ids`` ``sample_auroc`` and ``sample_aupr`` (average precision) over the parts; with a
        ``threshold`` (calibrated on normal images, never on this set) also precision, recall, F1
        and false-alarm rate at it; with a ``pixel_threshold`` the quality of the masks ``map >
        pixel_threshold``: :func:`pixel_decisions`, and on the good images the share with any pixel
        above it and the mean share of their pixels above it. Each key is one of
        :data:`anomaly.metrics.registry.METRICS`, which tells the reports how to show it: a new metric is
        an entry there and its computation here. Raises ``UndefinedMetricError`` when a metric is
        undefined, e.g. when the test set holds only one class.
        """
        with_pixels, num_pixels, map_shape = self._agree_on_layout(collective)
        scores = _gathered(self._scores, torch.float32, collective)
        labels = _gathered(self._labels, torch.bool, collective)
        _require_both_classes(int((~labels).sum()), int(labels.sum()), "image metrics", "images")
        f1, best = f1_max(scores, labels)
        metrics = {"image_auroc": _auroc(scores, labels), "image_f1_max": f1, "image_f1_threshold": best}
        if self.part_ids is not None:
            metrics.update(self._per_sample_metrics(scores, labels, collective))
        if threshold is not None:
            metrics.update(metrics_at_threshold(scores, labels, threshold))
        if not with_pixels:
            return metrics
        if num_pixels > self.exact_pixel_limit:
            metrics.update(self._binned_pixel_metrics(num_pixels, pixel_threshold, collective))
        else:
            metrics.update(self._exact_pixel_metrics(labels, map_shape, pixel_threshold, collective))
        if pixel_threshold is not None:
            maxima = _gathered(self._map_maxima, torch.float32, collective)
            above = maxima[~labels] > pixel_threshold  # [good images]
            metrics["good_images_with_false_positive_pixels"] = float(above.double().mean())
        return metrics

    def _per_sample_metrics(self, scores: Tensor, labels: Tensor, collective: Collective) -> dict[str, float]:
        """``sample_auroc`` and ``sample_aupr`` over the parts the test images show (their ids found by
        each image's position, gathered like the scores)."""
        positions = _gathered(self._indices, torch.int64, collective)
        part_scores, part_labels = per_sample(scores, labels, self.part_ids[positions])
        _require_both_classes(int((~part_labels).sum()), int(part_labels.sum()), "sample metrics", "parts")
        average_precision = binary_average_precision(_to_unit_interval(part_scores), part_labels.long())
        return {"sample_auroc": _auroc(part_scores, part_labels), "sample_aupr": float(average_precision)}

    def _agree_on_layout(self, collective: Collective) -> tuple[bool, int, tuple[int, ...]]:
        """Over all ranks: whether pixel metrics are computed, the number of map pixels, and one map's shape
        ``(1, H, W)`` (which a rank without images needs to take part in gathering the maps)."""
        shape = tuple(self._maps[0].shape[1:]) if self._maps else (1, 0, 0)
        num_images = sum(len(scores) for scores in self._scores)
        local = [num_images, int(bool(self._with_pixels)), self._num_pixels, *shape]
        ranks = collective.gather_rows(torch.tensor([local]))
        ranks = ranks[ranks[:, 0] > 0]  # those with images
        if len(ranks) == 0:
            raise ValueError("no batch to evaluate: update() was never called")
        if ranks[:, 1].unique().numel() > 1:
            raise ValueError("masks were given on some ranks but not on others")
        return bool(ranks[0, 1]), int(ranks[:, 2].sum()), tuple(ranks[0, 3:].tolist())

    def _exact_pixel_metrics(
        self,
        labels: Tensor,
        map_shape: tuple[int, ...],
        pixel_threshold: float | None,
        collective: Collective,
    ) -> dict[str, float]:
        maps = _gathered(self._maps, torch.float32, collective, map_shape)
        masks = _gathered(self._masks, torch.bool, collective, map_shape)
        num_defect = int(masks.sum())
        _require_both_classes(masks.numel() - num_defect, num_defect, "pixel metrics", "pixels")
        auroc, area = pixel_auroc_and_aupro(maps, masks, self.aupro_fpr_limit)
        metrics = {"pixel_auroc": auroc, "pixel_aupro": area}
        if pixel_threshold is not None:
            metrics["pixel_threshold"] = pixel_threshold
            metrics.update(pixel_decisions(maps, masks, pixel_threshold))
            metrics["good_false_positive_area"] = float((maps[~labels] > pixel_threshold).double().mean())
        return metrics

    def _binned_pixel_metrics(
        self, num_pixels: int, pixel_threshold: float | None, collective: Collective
    ) -> dict[str, float]:
        if self._histogram is None:  # this rank's share of the test set was within the limit
            self._count_into_histogram()
        histogram = self._histogram.all_reduced(collective)
        _require_both_classes(*histogram.pixel_counts(), "pixel metrics", "pixels")
        metrics = histogram.pixel_metrics(self.aupro_fpr_limit)
        if collective.rank == 0:
            log.info(
                "Pixel metrics of %d pixels (above evaluation.exact_pixel_limit=%d) from a histogram of %d"
                " bins: pixel AUROC within %.1e, AUPRO within %.1e of the exact values.",
                num_pixels, self.exact_pixel_limit, self.histogram_bins,
                metrics["pixel_auroc_max_error"], metrics["pixel_aupro_max_error"],
            )  # fmt: skip
        if pixel_threshold is not None:
            metrics["pixel_threshold"] = pixel_threshold
            metrics.update(histogram.decisions(pixel_threshold))
        return metrics


class CategoryEvaluators:
    """The test metrics of each category (a unified run: one model for several), an :class:`Evaluator`
    each: its AUROCs, AUPRO, F1-max and, at the run's one calibrated threshold, its precision, recall and
    false-alarm rate observed on its own good test images.

    The categories share one pixel budget: their pixel metrics are exact while the maps of all of them
    together stay within ``exact_pixel_limit`` (the memory of a one-category run), else every category's
    come from its histogram, with error bounds. One category is exactly an :class:`Evaluator`.
    """

    def __init__(
        self,
        categories: Sequence[str],
        compute_pixel_metrics: bool = True,
        aupro_fpr_limit: float = 0.3,
        exact_pixel_limit: int = DEFAULT_EXACT_PIXEL_LIMIT,
        histogram_bins: int = DEFAULT_BINS,
        part_ids: Tensor | None = None,
    ) -> None:
        if not categories:
            raise ValueError("CategoryEvaluators needs at least one category")
        self.exact_pixel_limit = exact_pixel_limit
        settings = (compute_pixel_metrics, aupro_fpr_limit, exact_pixel_limit, histogram_bins, part_ids)
        # part_ids by position in the whole test set: each category's evaluator finds its own images'
        self.evaluators = {category: Evaluator(*settings) for category in categories}

    def update(
        self,
        categories: Sequence[str],
        image_scores: Tensor,
        labels: Tensor,
        anomaly_maps: Tensor | None = None,
        masks: Tensor | None = None,
        indices: Tensor | None = None,
    ) -> None:
        """Adds one batch, each image to its category's evaluator; ``categories``: one name per image, the
        tensors as :meth:`Evaluator.update` takes them."""
        names = list(categories)
        if len(set(names)) == 1:
            self.evaluators[names[0]].update(image_scores, labels, anomaly_maps, masks, indices)
        else:
            for category in dict.fromkeys(names):
                rows = torch.tensor([name == category for name in names])
                batch = (image_scores, labels, anomaly_maps, masks, indices)
                self.evaluators[category].update(
                    *(None if t is None else t[rows.to(t.device)] for t in batch)
                )
        if sum(evaluator.num_pixels for evaluator in self.evaluators.values()) > self.exact_pixel_limit:
            self._count_into_histograms()

    def compute(
        self,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        collective: Collective = LOCAL,
    ) -> dict[str, dict[str, float]]:
        """{category: its metrics (:meth:`Evaluator.compute`)} over every rank of ``collective`` (each rank
        calls it, with every category, whether or not it held images of it)."""
        pixels = sum(evaluator.num_pixels for evaluator in self.evaluators.values())
        if collective.sum(torch.tensor(float(pixels), dtype=torch.float64)) > self.exact_pixel_limit:
            self._count_into_histograms()
        return {
            category: evaluator.compute(threshold, pixel_threshold, collective)
            for category, evaluator in self.evaluators.items()
        }

    def _count_into_histograms(self) -> None:
        for evaluator in self.evaluators.values():
            evaluator.count_into_histogram()


NOT_AVERAGED = ("image_f1_threshold",)  # each category's own best threshold, chosen on its test set


def mean_over_categories(per_category: dict[str, dict[str, float]]) -> dict[str, float]:
    """The unified protocol's headline numbers: each metric's mean over the categories (the run's one
    threshold stays itself; an error bound's mean bounds the mean's error), except :data:`NOT_AVERAGED`."""
    metrics = list(per_category.values())
    keys = [key for key in metrics[0] if key not in NOT_AVERAGED and all(key in m for m in metrics)]
    return {key: mean(m[key] for m in metrics) for key in keys}


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


def _gathered(
    batches: list[Tensor], dtype: torch.dtype, collective: Collective, row_shape: tuple[int, ...] = ()
) -> Tensor:
    """Every rank's batches (rows of ``row_shape``) concatenated in rank order, on the CPU (the one-process
    order: each rank holds a contiguous block of the test set). This rank's are kept merged."""
    return collective.gather_rows(_merge(batches) if batches else torch.empty((0, *row_shape), dtype=dtype))


_BOTH_CLASSES_FIX = {
    "images": "the test set needs good and defective images.",
    "parts": "the test set needs good and defective parts (a part is defective when any of its views is).",
    "pixels": "the defective images' masks must mark some pixels (any non-zero value) and not all of them: "
    "check the ground-truth mask files.",
}


def _require_both_classes(num_good: int, num_defective: int, metrics: str, items: str) -> None:
    if num_good == 0 or num_defective == 0:
        raise UndefinedMetricError(
            f"{metrics} need both classes, got {num_good} good, {num_defective} defective {items}: "
            f"{_BOTH_CLASSES_FIX[items]}"
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
