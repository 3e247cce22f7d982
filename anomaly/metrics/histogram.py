"""Pixel AUROC and AUPRO in bounded memory: the anomaly-map values counted into bins instead of kept.

The exact metrics (:mod:`anomaly.metrics.aupro`) sort every pixel of the test set. A
:class:`PixelHistogram` holds a fixed number of bins whatever the test set's size, 48 bytes each (48 MB
at the default 2^20), plus 4 bytes per defect region. torchmetrics' binned curves (``thresholds=``) would
need the thresholds before the first batch and compare every pixel with every threshold (pixels x
thresholds work per batch); here each pixel is added to its one bin.

**Grid.** Bin k is ``[k w, (k + 1) w)`` for one power-of-two width ``w = 2^e``, and the histogram holds
``num_bins`` consecutive bins. The range is never given in advance nor taken from the labels: ``w`` is
the smallest power of two for which the values seen so far fit into the bins (but at least 2^-50 of their
largest magnitude, so that bin indices stay exact in float64). When a batch falls outside, ``w`` doubles
until it fits; each bin of width 2w is the union of two of width w, so the counts merge exactly. The grid
is therefore a function of the data's minimum and maximum alone, not of the order of the batches or of
how ranks split the test set, and more than half of the bins span the range: ``w < 2 (max - min) /
(num_bins - 1)`` (unless the values span less than ~2^-30 of their magnitude, where the floor holds).

**Error bound.** The pixels at or above a bin edge are exactly those of the bins from it up, so each
edge gives an exact point of the ROC and PRO curves. Between two such points the exact curve is
monotone, so it stays inside the rectangle they span, and the straight line between them is off by at
most half of its area; when the bin holds a single distinct value (ties) the exact curve is that straight
line too. Hence, with ``p_b`` and ``n_b`` the shares of defect and of defect-free pixels in bin b::

    |binned pixel AUROC - exact| <= 1/2 sum of p_b n_b over bins of more than one distinct value
                                 <= 1/2 min(max_b p_b, max_b n_b)

that is, at most 1e-4 unless some bin holds more than 0.02 % of the defect pixels and more than 0.02 %
of the defect-free ones (a bin is about 1/2^19 of the range wide by default). For AUPRO the same sum
runs over the rectangles of (FPR, PRO) below the FPR limit, the one the limit cuts counted in full,
divided by the limit. :meth:`PixelHistogram.pixel_metrics` computes both bounds from the counts and
reports them.

**Regions.** PRO at a threshold is the mean over regions of the share of the region's pixels at or above
it, that is the sum over those defect pixels of ``1 / (number of regions x size of the pixel's region)``.
A histogram of the defect pixels weighted by ``1 / region size`` therefore gives PRO exactly at every
edge, without counts per region and bin (regions x bins). Regions are the 8-connected components of each
image's mask, so they are complete within one batch; of each region only its maximum is kept, for the
share of regions detected at a threshold.
"""

import copy
import math

import torch
from torch import Tensor

from anomaly.distributed import LOCAL, Collective
from anomaly.metrics.aupro import area_up_to, label_regions

DEFAULT_BINS = 2**20
_FINEST = 50  # bins are at least 2^-50 of the largest magnitude: indices below 2^50 are exact in float64
_CHUNK_PIXELS = 2**21  # pixels binned at once, which bounds the temporaries (~40 bytes a pixel)


class PixelHistogram:
    """Counts of the anomaly-map values of a test set on one adaptive grid (see the module docstring).

    Per bin i: ``counts[i, g, d]`` int64 ``[num_bins, 2, 2]``, its pixels of good (g = 1) or defective
    images that are defect (d = 1) or defect-free pixels; :attr:`pro_mass` ``[num_bins]`` float64, the sum
    over its defect pixels of 1 / region size; :attr:`value_range` ``[num_bins, 2]`` float32, its smallest
    and largest value. Per batch, :attr:`region_maxima` ``[regions]``: each region's largest value.
    """

    def __init__(self, num_bins: int = DEFAULT_BINS) -> None:
        self.num_bins = num_bins
        self.low, self.high = math.inf, -math.inf  # the range of the values counted so far
        self.exponent, self.offset = 0, 0  # array position i is bin k = offset + i of width 2^exponent
        self.counts = torch.zeros(num_bins, 2, 2, dtype=torch.int64)
        self.pro_mass = torch.zeros(num_bins, dtype=torch.float64)
        self.value_range = _empty_ranges(num_bins)
        self.region_maxima: list[Tensor] = []

    def add(self, anomaly_maps: Tensor, masks: Tensor, good: Tensor) -> None:
        """Counts a batch: ``anomaly_maps`` float32 ``[N, 1, H, W]``, ``masks`` bool ``[N, 1, H, W]``,
        ``good`` bool ``[N]`` (the good images), all on the CPU."""
        per_chunk = max(1, _CHUNK_PIXELS // anomaly_maps[0].numel())
        chunks = (anomaly_maps.split(per_chunk), masks.split(per_chunk), good.split(per_chunk))
        for chunk in zip(*chunks, strict=True):
            self._add(*chunk)

    def _add(self, anomaly_maps: Tensor, masks: Tensor, good: Tensor) -> None:
        values = anomaly_maps.reshape(-1)
        if not values.isfinite().all():
            raise ValueError("anomaly maps contain NaN or infinity")
        self._regrid(min(self.low, float(values.min())), max(self.high, float(values.max())))
        index = self._index(values.double())
        regions, num_regions = label_regions(masks[:, 0])
        defect = regions > 0
        good_pixels = good.repeat_interleave(anomaly_maps[0].numel())
        keys = (index * 2 + good_pixels) * 2 + defect
        self.counts.view(-1).index_add_(0, keys, torch.ones_like(keys))
        self.value_range[:, 0].scatter_reduce_(0, index, values, "amin")
        self.value_range[:, 1].scatter_reduce_(0, index, values, "amax")
        weights = torch.bincount(regions).double().reciprocal()[regions[defect]]
        self.pro_mass.index_add_(0, index[defect], weights)
        maxima = torch.full((num_regions,), -math.inf)
        maxima.scatter_reduce_(0, regions[defect].long() - 1, values[defect], "amax")
        self.region_maxima.append(maxima)

    def _index(self, values: Tensor) -> Tensor:
        """Array positions ``[P]`` int64 of float64 ``values`` ``[P]`` on the current grid."""
        return values.mul(2.0**-self.exponent).floor_().long().sub_(self.offset)

    def _regrid(self, low: float, high: float) -> None:
        """Moves to the finest grid that holds ``[low, high]`` (which contains the range counted so far),
        merging the bins counted so far into the wider ones."""
        exponent = math.frexp(max(abs(low), abs(high)))[1] - _FINEST
        while _bin(high, exponent) - _bin(low, exponent) >= self.num_bins:
            exponent += 1
        offset = _bin(low, exponent)
        if self.low <= self.high and (exponent, offset) != (self.exponent, self.offset):
            old_bins = torch.arange(self.offset, self.offset + self.num_bins, dtype=torch.float64)
            lower_edges = old_bins * 2.0**self.exponent
            self.exponent, self.offset = exponent, offset
            # Each old bin lies in the new bin of its lower edge; bins above the old maximum are empty.
            index = self._index(lower_edges).clamp_(max=self.num_bins - 1)
            self.counts = torch.zeros_like(self.counts).index_add_(0, index, self.counts)
            self.pro_mass = torch.zeros_like(self.pro_mass).index_add_(0, index, self.pro_mass)
            value_range, self.value_range = self.value_range, _empty_ranges(self.num_bins)
            self.value_range[:, 0].scatter_reduce_(0, index, value_range[:, 0], "amin")
            self.value_range[:, 1].scatter_reduce_(0, index, value_range[:, 1], "amax")
        self.exponent, self.offset, self.low, self.high = exponent, offset, low, high

    def all_reduced(self, collective: Collective = LOCAL) -> "PixelHistogram":
        """The histogram of every rank's pixels, on every rank: the ranks agree on the grid of the overall
        minimum and maximum, then combine their bins. Every rank of ``collective`` calls it; this rank's
        histogram is left as it is."""
        total = copy.deepcopy(self)
        bounds = torch.tensor([[self.low, self.high]], dtype=torch.float64)
        total._regrid(*_over_ranks(bounds, collective)[0].tolist())
        total.counts = collective.sum(total.counts)
        total.pro_mass = collective.sum(total.pro_mass)
        total.value_range = _over_ranks(total.value_range, collective)
        total.region_maxima = [collective.gather_rows(torch.cat([torch.empty(0), *self.region_maxima]))]
        return total

    def pixel_counts(self) -> tuple[int, int]:
        """The numbers of defect-free and of defect pixels."""
        defect_free, defect = self._by_pixel().sum(dim=0).tolist()
        return defect_free, defect

    def _by_pixel(self) -> Tensor:
        """``[num_bins, 2]``: the defect-free and the defect pixels per bin, of good and defective images."""
        return self.counts[:, 0] + self.counts[:, 1]

    def pixel_metrics(self, fpr_limit: float) -> dict[str, float]:
        """``pixel_auroc``, ``pixel_aupro`` (up to ``fpr_limit``) and the bounds on their error,
        ``pixel_auroc_max_error`` and ``pixel_aupro_max_error``; needs both kinds of pixels."""
        counts = self._by_pixel()
        kept = (counts[:, 0] + counts[:, 1]) > 0  # an empty bin adds no point to the curves
        defect_free, defect = counts[kept].flip(0).unbind(1)  # from the top bin down
        fpr, tpr = _rising(defect_free) / int(defect_free.sum()), _rising(defect) / int(defect.sum())
        pro = _rising(self.pro_mass[kept].flip(0)) / sum(len(maxima) for maxima in self.region_maxima)
        low, high = self.value_range[kept].flip(0).unbind(1)
        mixed = low < high  # bins of more than one distinct value
        return {
            "pixel_auroc": float(torch.trapezoid(tpr, fpr)),
            "pixel_aupro": area_up_to(fpr, pro, fpr_limit) / fpr_limit,
            "pixel_auroc_max_error": _chord_error(fpr, tpr, mixed, 1.0),
            "pixel_aupro_max_error": _chord_error(fpr, pro, mixed, fpr_limit) / fpr_limit,
        }

    def decisions(self, threshold: float) -> dict[str, float]:
        """:func:`~anomaly.metrics.aupro.pixel_decisions` and ``good_false_positive_area`` (the share of
        the good images' pixels above ``threshold``). The share of regions detected is exact (from each
        region's maximum); the others are exact unless the threshold lies between the smallest and the
        largest value of its bin, where the bin's pixels above it are interpolated linearly."""
        defect_free, defect = self._by_pixel().unbind(1)
        good_image_pixels = self.counts[:, 1, 0] + self.counts[:, 1, 1]
        columns = (defect_free, defect, good_image_pixels, self.pro_mass)
        false_positives, true_positives, good_above, pro_above = (self._above(c, threshold) for c in columns)
        num_defect, num_good_image_pixels = int(defect.sum()), int(good_image_pixels.sum())
        maxima = torch.cat(self.region_maxima)
        # F1 = 2 TP / (2 TP + FP + FN), and TP + FN is the number of defect pixels
        f1 = 2 * true_positives / max(true_positives + num_defect + false_positives, 1)
        return {
            "pixel_f1_at_threshold": f1,
            "region_overlap_at_threshold": pro_above / len(maxima),
            "regions_detected_at_threshold": float((maxima > threshold).double().mean()),
            "good_false_positive_area": good_above / num_good_image_pixels,
        }

    def _above(self, per_bin: Tensor, threshold: float) -> float:
        """The sum of ``per_bin`` ``[num_bins]`` over the values above ``threshold``."""
        index = _bin(threshold, self.exponent) - self.offset
        if index < 0:
            return float(per_bin.sum())
        if index >= self.num_bins:
            return 0.0
        low, high = self.value_range[index].tolist()
        share = 1.0 if threshold < low else 0.0 if threshold >= high else (high - threshold) / (high - low)
        return float(per_bin[index + 1 :].sum()) + share * float(per_bin[index])


def _empty_ranges(num_bins: int) -> Tensor:
    """``[num_bins, 2]`` value ranges (smallest, largest) of empty bins: (inf, -inf)."""
    return torch.tensor([math.inf, -math.inf]).repeat(num_bins, 1)


def _over_ranks(ranges: Tensor, collective: Collective) -> Tensor:
    """Per row of ``ranges`` ``[n, 2]`` (smallest, largest), the smallest and largest over all ranks."""
    signs = torch.tensor([-1.0, 1.0], dtype=ranges.dtype)
    return collective.max(ranges * signs) * signs  # min as -max(-x)


def _bin(value: float, exponent: int) -> int:
    """The grid index k of ``value``: its bin is [k 2^exponent, (k + 1) 2^exponent)."""
    return math.floor(math.ldexp(value, -exponent))


def _rising(per_bin: Tensor) -> Tensor:
    """0 followed by the cumulative sums of ``per_bin`` ``[bins]``, in float64 ``[bins + 1]``."""
    return torch.cat([torch.zeros(1, dtype=torch.float64), per_bin.cumsum(0, dtype=torch.float64)])


def _chord_error(x: Tensor, y: Tensor, mixed: Tensor, x_max: float) -> float:
    """How far the area up to ``x_max`` under the polyline through ``(x, y)`` ``[bins + 1]`` (both
    non-decreasing) can be from that under the exact curve, which passes through the same points and is
    non-decreasing in between: half of each segment's rectangle, the whole of the one ``x_max`` cuts, and
    nothing where the segment's bin holds one distinct value (``mixed`` ``[bins]`` false)."""
    width = (x[1:].clamp(max=x_max) - x[:-1]).clamp(min=0)
    share = torch.where(x[1:] > x_max, 1.0, 0.5) * mixed
    return float((width * (y[1:] - y[:-1]) * share).sum())
