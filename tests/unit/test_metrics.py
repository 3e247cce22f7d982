"""Metrics against hand-computed values and a brute-force AUPRO reference."""

import numpy as np
import pytest
import torch
from scipy import ndimage
from torchmetrics.functional.classification import binary_auroc

from anomaly.metrics import Evaluator, aupro, f1_max
from anomaly.metrics.aupro import pixel_auroc_and_aupro


def _two_region_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 6x6 images, one region each: R1 (4 px) in image A, R2 (8 px) in image B; 60 normal pixels.

    Scores of the region pixels:  R1: 0.9, 0.9, 0.5, 0.0   R2: 0.8 x2, 0.3 x6
    Scores of the normal pixels:  0.9 x3 (image B), 0.6 x6 (A), 0.3 x12 (6 in A, 6 in B), 0.0 x39
    """
    maps, masks = torch.zeros(2, 1, 6, 6), torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    a, b = maps[0, 0], maps[1, 0]
    masks[0, 0, 0:2, 0:2] = True
    a[0:2, 0:2] = torch.tensor([[0.9, 0.9], [0.5, 0.0]])
    a[4], a[5] = 0.3, 0.6
    masks[1, 0, 3:5, 1:5] = True
    b[3, 1:5] = torch.tensor([0.8, 0.8, 0.3, 0.3])
    b[4, 1:5] = 0.3
    b[0, 0:3] = 0.9
    b[1] = 0.3
    return maps, masks


def test_aupro_two_regions_by_hand() -> None:
    maps, masks = _two_region_case()
    # threshold  R1 overlap  R2 overlap  PRO = mean   false positives  FPR = FP / 60
    #   0.9        2/4         0/8         0.25            3              0.05   (ties merged: one point)
    #   0.8        2/4         2/8         0.375           3              0.05
    #   0.6        2/4         2/8         0.375           9              0.15
    #   0.5        3/4         2/8         0.5             9              0.15
    #   0.3        3/4         8/8         0.875          21              0.35
    #   0.0        4/4         8/8         1              60              1
    # Curve: (0, 0) (0.05, 0.25) (0.05, 0.375) (0.15, 0.375) (0.15, 0.5) (0.35, 0.875) (1, 1).
    first = 0.5 * (0 + 0.25) * 0.05  # 0.00625
    second = 0.375 * 0.10  # 0.0375 (the vertical steps add nothing)
    # fpr_limit = 0.15 is a curve point: no interpolation.
    assert aupro(maps, masks, fpr_limit=0.15) == pytest.approx((first + second) / 0.15, abs=1e-6)
    # fpr_limit = 0.3 lies between (0.15, 0.5) and (0.35, 0.875):
    # PRO(0.3) = 0.5 + (0.875 - 0.5) * (0.3 - 0.15) / (0.35 - 0.15) = 0.78125.
    third = 0.5 * (0.5 + 0.78125) * 0.15  # 0.09609375
    assert aupro(maps, masks, fpr_limit=0.3) == pytest.approx((first + second + third) / 0.3, abs=1e-6)
    # The whole curve: 0.00625 + 0.0375 + 0.5 * (0.5 + 0.875) * 0.2 + 0.5 * (0.875 + 1) * 0.65 = 0.790625.
    assert aupro(maps[:, 0], masks[:, 0], fpr_limit=1.0) == pytest.approx(0.790625, abs=1e-6)


def test_aupro_regions_are_8_connected() -> None:
    # Defect pixels (0, 0) and (1, 1) touch diagonally: one 2-px region; (3, 3) is a second region.
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 3, 3] = True
    maps = torch.zeros(1, 4, 4)
    maps[0, 0, 0] = 1.0
    # At threshold 1: PRO = (1/2 + 0) / 2 = 0.25 at FPR 0; then (1, 1). PRO(0.3) = 0.25 + 0.75 * 0.3 = 0.475.
    # With 4-connectivity there would be three regions: PRO = 1/3 and AUPRO = 0.4333.
    expected = 0.5 * (0.25 + 0.475) * 0.3 / 0.3  # 0.3625
    assert aupro(maps, masks, fpr_limit=0.3) == pytest.approx(expected, abs=1e-9)


def _random_case(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four 12x12 maps with many tied scores; the last image is defect-free."""
    generator = torch.Generator().manual_seed(seed)
    maps = torch.randint(0, 25, (4, 12, 12), generator=generator).float() / 25
    masks = torch.rand(4, 12, 12, generator=generator) < 0.15
    masks[-1] = False
    maps[masks] += 0.2  # defects score somewhat higher
    return maps, masks


def test_aupro_perfect_and_inverted_maps() -> None:
    _, masks = _random_case(seed=0)
    assert aupro(masks.float(), masks) == pytest.approx(1.0, abs=1e-12)
    assert aupro(1 - masks.float(), masks) == pytest.approx(0.0, abs=1e-12)


def _brute_force_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """PRO and FPR recomputed from scratch at every distinct threshold; maps, masks ``[N, H, W]``."""
    labeled = [ndimage.label(mask, structure=np.ones((3, 3)))[0] for mask in masks]
    regions = [(i, labels == k) for i, labels in enumerate(labeled) for k in range(1, labels.max() + 1)]
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        fprs.append(predicted[~masks].mean())
        pros.append(np.mean([predicted[i][region].mean() for i, region in regions]))
    x, y = np.array(fprs), np.array(pros)
    # Cut at the limit, adding the curve's linear interpolation there when the limit is not a point.
    inside = int(np.searchsorted(x, fpr_limit, side="right"))
    x_cut, y_cut = x[:inside], y[:inside]
    if x_cut[-1] < fpr_limit:
        y_at_limit = np.interp(fpr_limit, x[inside - 1 : inside + 1], y[inside - 1 : inside + 1])
        x_cut, y_cut = np.append(x_cut, fpr_limit), np.append(y_cut, y_at_limit)
    return float(np.trapezoid(y_cut, x_cut)) / fpr_limit


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_matches_brute_force(seed: int, fpr_limit: float) -> None:
    maps, masks = _random_case(seed)
    expected = _brute_force_aupro(maps.numpy(), masks.numpy(), fpr_limit)
    assert aupro(maps, masks, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", [1, 3])
def test_pixel_auroc_from_the_shared_sort_equals_torchmetrics(seed: int) -> None:
    maps, masks = _random_case(seed)  # with many ties
    maps /= maps.max()  # in [0, 1], so torchmetrics takes them as probabilities, not logits
    auroc, area = pixel_auroc_and_aupro(maps, masks, fpr_limit=0.3)
    expected = binary_auroc(maps.flatten(), masks.flatten().long(), thresholds=None)  # float32 inside
    assert auroc == pytest.approx(float(expected), abs=1e-6)
    assert auroc == pytest.approx(_pairwise_auroc(maps.flatten(), masks.flatten()), abs=1e-9)
    assert area == aupro(maps, masks, fpr_limit=0.3)


def test_pixel_metrics_order_negative_scores_and_signed_zeros_as_floats() -> None:
    maps, masks = _random_case(2)
    maps = maps - 0.6  # negative scores too
    maps[0, :3], maps[1, :3] = 0.0, -0.0  # equal scores, different bits: must tie
    auroc, area = pixel_auroc_and_aupro(maps, masks, fpr_limit=0.3)
    assert auroc == pytest.approx(_pairwise_auroc(maps.flatten(), masks.flatten()), abs=1e-9)
    assert area == pytest.approx(_brute_force_aupro(maps.numpy(), masks.numpy(), 0.3), abs=1e-9)


def test_aupro_rejects_undefined_cases() -> None:
    maps = torch.rand(2, 4, 4)
    with pytest.raises(ValueError, match="defect region"):
        aupro(maps, torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="defect-free pixels"):
        aupro(maps, torch.ones(2, 4, 4))


def test_f1_max_by_hand() -> None:
    # threshold  TP FP FN  precision recall  F1
    #   80        1  0  1    1        1/2    2/3
    #   40        1  1  1    1/2      1/2    1/2
    #   35        2  1  0    2/3      1      0.8   <- best
    #   10        2  2  0    1/2      1      2/3
    # Scores outside [0, 1] also check that the threshold comes back in the scores' own units.
    f1, threshold = f1_max(torch.tensor([10.0, 40.0, 35.0, 80.0]), torch.tensor([0, 0, 1, 1]))
    assert f1 == pytest.approx(0.8, abs=1e-6)
    assert threshold == 35.0


def _pairwise_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """P(defective score > good score) + 0.5 P(equal), over all pairs."""
    positive, negative = scores[labels.bool()], scores[~labels.bool()]
    greater = (positive[:, None] > negative[None, :]).double()
    ties = (positive[:, None] == negative[None, :]).double()
    return float((greater + 0.5 * ties).mean())


def test_evaluator_image_metrics_by_hand() -> None:
    scores, labels = torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])
    # Pairs (defective, good): 0.35>0.1 yes, 0.35>0.4 no, 0.8>0.1 yes, 0.8>0.4 yes -> 3/4.
    # Scores shifted by 100 would all become 1.0 under torchmetrics' float32 sigmoid: must not matter.
    for shift in (0.0, 100.0):
        evaluator = Evaluator()
        evaluator.update(scores[:2] + shift, labels[:2])
        evaluator.update(scores[2:] + shift, labels[2:])
        metrics = evaluator.compute()
        assert set(metrics) == {"image_auroc", "image_f1_max", "image_f1_threshold"}
        assert metrics["image_auroc"] == pytest.approx(0.75, abs=1e-6)
        assert metrics["image_f1_threshold"] == pytest.approx(0.35 + shift, abs=1e-5)


def test_evaluator_pixel_metrics_end_to_end() -> None:
    generator = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(3):
        masks = torch.rand(2, 1, 5, 5, generator=generator) < 0.2
        masks[1] = False  # one good image per batch
        maps = torch.rand(2, 1, 5, 5, generator=generator) + masks
        batches.append((maps.amax(dim=(1, 2, 3)), masks.any(dim=(1, 2, 3)).long(), maps, masks.long()))
    evaluator, image_only = Evaluator(), Evaluator(compute_pixel_metrics=False)
    for batch in batches:
        evaluator.update(*batch)
        image_only.update(*batch)

    metrics = evaluator.compute()
    assert evaluator.compute() == metrics  # the merged maps are kept and reused
    all_maps, all_masks = torch.cat([b[2] for b in batches]), torch.cat([b[3] for b in batches])
    assert metrics["pixel_auroc"] == pytest.approx(_pairwise_auroc(all_maps.flatten(), all_masks.flatten()))
    assert metrics["pixel_aupro"] == pytest.approx(aupro(all_maps, all_masks))
    scores, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert metrics["image_auroc"] == pytest.approx(_pairwise_auroc(scores, labels))
    assert set(image_only.compute()) == {"image_auroc", "image_f1_max", "image_f1_threshold"}


def test_evaluator_rejects_single_class_and_partial_masks() -> None:
    evaluator = Evaluator()
    evaluator.update(torch.rand(4), torch.zeros(4))
    with pytest.raises(ValueError, match="4 good, 0 defective images"):
        evaluator.compute()
    evaluator.reset()
    evaluator.update(torch.rand(2), torch.tensor([0, 1]), torch.rand(2, 1, 3, 3), torch.ones(2, 1, 3, 3))
    with pytest.raises(ValueError, match="some batches"):
        evaluator.update(torch.rand(2), torch.tensor([0, 1]))
