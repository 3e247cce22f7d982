"""Area under the per-region-overlap curve (AUPRO), as the official MVTec AD evaluation defines it.

Bergmann et al., "The MVTec Anomaly Detection Dataset" (IJCV 2021); official code
``pro_curve_util.compute_pro`` and ``generic_util.trapezoid``. Pixel AUROC comes from the same sort
of all pixels (equal to torchmetrics' ``binary_auroc``, tested): sorting millions of pixels is most of
either metric's cost, so the test set's pixels are sorted once, not twice. Test sets too large to sort are
binned instead (:mod:`anomaly.metrics.histogram`).
"""

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

from anomaly.errors import UndefinedMetricError

# 8-connectivity within each image and none across images: a 3D structure whose only
# non-zero plane is the middle one labels every [H, W] slice as ndimage.label(mask, np.ones((3, 3))).
_PER_IMAGE_8_CONNECTIVITY = np.zeros((3, 3, 3), dtype=bool)
_PER_IMAGE_8_CONNECTIVITY[1] = True


def aupro(anomaly_maps: Tensor, masks: Tensor, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (1.0 = perfect).

    Ground-truth regions are the 8-connected components of each image's mask. At a threshold t,
    a region's overlap is the fraction of its pixels with score >= t; PRO is the mean overlap over
    all regions of all images, and FPR is the fraction of all defect-free pixels (of good and
    defective images) with score >= t. PRO is integrated over FPR in ``[0, fpr_limit]`` with the
    trapezoid rule, interpolating the curve linearly at ``fpr_limit``, and divided by ``fpr_limit``.

    ``anomaly_maps``: float ``[N, H, W]`` or ``[N, 1, H, W]``; ``masks``: same shape, bool or 0/1.
    """
    return pixel_auroc_and_aupro(anomaly_maps, masks, fpr_limit)[1]


def pixel_auroc_and_aupro(anomaly_maps: Tensor, masks: Tensor, fpr_limit: float = 0.3) -> tuple[float, float]:
    """Pixel AUROC (over all pixels) and :func:`aupro`, from one sort; same inputs as :func:`aupro`."""
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    scores, regions, num_regions = _flatten_and_label(anomaly_maps, masks)
    fpr, tpr, pro = _roc_and_pro_curves(scores, regions, num_regions)
    return float(torch.trapezoid(tpr, fpr)), area_up_to(fpr, pro, fpr_limit) / fpr_limit


def pixel_decisions(anomaly_maps: Tensor, masks: Tensor, threshold: float) -> dict[str, float]:
    """Quality of the defect masks ``map > threshold`` against the ground truth (same inputs as
    :func:`aupro`): pixel F1 over all pixels, the mean overlap of the ground-truth regions (PRO at this
    threshold) and the share of regions hit by at least one pixel."""
    scores, regions, num_regions = _flatten_and_label(anomaly_maps, masks)
    predicted = scores > threshold
    defect = regions > 0
    true_positives = int((predicted & defect).sum())
    wrong = int((predicted ^ defect).sum())  # false positives + false negatives
    hits = torch.bincount(regions[predicted], minlength=num_regions + 1)[1:].double()
    sizes = torch.bincount(regions, minlength=num_regions + 1)[1:].double()
    return {
        "pixel_f1_at_threshold": 2 * true_positives / max(2 * true_positives + wrong, 1),
        "region_overlap_at_threshold": float((hits / sizes).mean()),
        "regions_detected_at_threshold": float((hits > 0).double().mean()),
    }


def _flatten_and_label(anomaly_maps: Tensor, masks: Tensor) -> tuple[Tensor, Tensor, int]:
    """Flat float32 scores ``[N*H*W]`` and region ids ``[N*H*W]`` (int32, 0 = defect-free, 1.. = region)."""
    if anomaly_maps.shape != masks.shape:
        raise ValueError(f"anomaly maps {tuple(anomaly_maps.shape)} and masks {tuple(masks.shape)} differ")
    if anomaly_maps.ndim == 4 and anomaly_maps.shape[1] == 1:
        anomaly_maps, masks = anomaly_maps[:, 0], masks[:, 0]
    if anomaly_maps.ndim != 3:
        raise ValueError(f"expected [N, H, W] or [N, 1, H, W] maps, got {tuple(anomaly_maps.shape)}")
    scores = anomaly_maps.detach().to("cpu", torch.float32).reshape(-1)  # as the Evaluator stores maps
    if torch.isnan(scores).any():
        raise ValueError("anomaly maps contain NaN")
    regions, num_regions = label_regions(masks)
    if num_regions == 0:
        raise UndefinedMetricError(
            "AUPRO needs at least one defect region, but every mask is empty: check the ground-truth mask "
            "files (a defect is any non-zero pixel)."
        )
    return scores, regions, num_regions


def label_regions(masks: Tensor) -> tuple[Tensor, int]:
    """Region ids ``[N*H*W]`` (int32: 0 = defect-free, 1.. = the 8-connected components of each image's
    mask) of masks ``[N, H, W]``, and the number of regions."""
    regions, num_regions = ndimage.label(masks.detach().cpu().bool().numpy(), _PER_IMAGE_8_CONNECTIVITY)
    return torch.from_numpy(regions).reshape(-1), num_regions


def _roc_and_pro_curves(scores: Tensor, regions: Tensor, num_regions: int) -> tuple[Tensor, Tensor, Tensor]:
    """Exact FPR, TPR and PRO, float64 ``[K + 1]`` each, starting at 0, one point per distinct score.

    Lowering the threshold past a pixel adds 1/num_normal to the FPR if the pixel is defect-free,
    or else 1/num_defective to the TPR and 1/(region_size * num_regions) to the PRO; so one
    descending sort and three cumulative sums give the whole curves.
    """
    region_sizes = torch.bincount(regions, minlength=num_regions + 1)
    num_normal = int(region_sizes[0])
    if num_normal == 0:
        raise UndefinedMetricError(
            "AUPRO needs defect-free pixels to count false positives, but every pixel is a defect: check the "
            "ground-truth mask files (a defect is any non-zero pixel)."
        )
    pro_step = 1.0 / (region_sizes.double() * num_regions)
    pro_step[0] = 0.0

    sorted_keys, regions = _sort_by_descending_score(scores, regions)
    # Pixels with equal scores cross the threshold together: keep the last point of each run.
    last_of_run = torch.ones_like(sorted_keys, dtype=torch.bool)
    torch.ne(sorted_keys[1:], sorted_keys[:-1], out=last_of_run[:-1])
    del sorted_keys
    points = last_of_run.nonzero().squeeze(1)

    defective = regions > 0
    tpr = defective.cumsum(0, dtype=torch.float64)[points] / (len(regions) - num_normal)
    fpr = (~defective).cumsum(0, dtype=torch.float64)[points] / num_normal
    pro = pro_step[regions].cumsum_(0)[points]
    zero = torch.zeros(1, dtype=torch.float64)
    return torch.cat([zero, fpr]), torch.cat([zero, tpr]), torch.cat([zero, pro])


def _sort_by_descending_score(scores: Tensor, regions: Tensor) -> tuple[Tensor, Tensor]:
    """Score keys and region ids ``[N]`` each, ordered by descending score (equal scores, equal keys).

    Each pixel becomes one int64: an int32 with the same order as its float32 score in the high half,
    its region id in the low half. Torch sorts integers ascending with a radix sort, which on CPU is
    ~4x faster than sorting the floats descending (31.6M pixels: 0.9 s against 3.7 s).
    """
    bits = (scores + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into 0.0, which must tie with it
    order_keys = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip all but the sign bit
    packed = torch.sort(order_keys.long() * 2**32 + regions.long()).values.flip(0)
    return packed >> 32, packed & 0xFFFFFFFF


def area_up_to(x: Tensor, y: Tensor, x_max: float) -> float:
    """Trapezoid area under y(x) on ``[x[0], x_max]`` for non-decreasing ``x`` with ``x[-1] >= x_max``.

    Like the official ``trapezoid(x, y, x_max)``: when ``x_max`` is not a curve point, y is
    interpolated linearly between its neighbours and the last partial trapezoid is added.
    """
    n = int(torch.searchsorted(x, torch.tensor([x_max], dtype=x.dtype), right=True))  # points with x <= x_max
    area = float(torch.trapezoid(y[:n], x[:n]))
    x0, y0 = float(x[n - 1]), float(y[n - 1])
    if x0 < x_max:
        x1, y1 = float(x[n]), float(y[n])
        y_max = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_max) * (x_max - x0)
    return area
