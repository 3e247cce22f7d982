"""Per-sample metrics (anomaly/metrics/per_sample.py): a part's score is the maximum over its views and it
is defective when any view is; the Evaluator finds each image's part by its test-set position, whatever
order the batches come in."""

from pathlib import Path

import pytest
import torch

from anomaly.data.samples import Sample, part_numbers
from anomaly.metrics import Evaluator
from anomaly.metrics.per_sample import per_sample

# three parts: 0 (good, two views), 1 (defective in its second view only), 2 (one view, defective)
SCORES = torch.tensor([0.2, 0.9, 0.1, 0.8, 0.5])
LABELS = torch.tensor([0, 0, 0, 1, 1])
PARTS = torch.tensor([0, 0, 1, 1, 2])


def test_a_part_scores_its_highest_view_and_is_defective_when_any_view_is():
    scores, labels = per_sample(SCORES, LABELS, PARTS)
    assert scores.tolist() == pytest.approx([0.9, 0.8, 0.5])
    assert labels.tolist() == [False, True, True]


def test_parts_are_numbered_by_first_appearance_and_single_images_are_parts_of_their_own():
    def sample(part: str | None) -> Sample:
        return Sample(Path("x.png"), 0, None, "good", sample_id=part)

    numbers = part_numbers([sample("b"), sample("a"), sample(None), sample("b"), sample(None)])
    assert numbers.tolist() == [0, 1, 2, 0, 3]
    assert part_numbers([sample(None), sample(None)]) is None  # no part named: no per-sample metrics


def test_the_evaluator_reports_per_sample_auroc_and_aupr_computed_by_hand():
    # parts: A good (views .9 .1), B good (.3 .3), C defective in one view (.8 .2), D in one view (.95 .05)
    scores = torch.tensor([0.9, 0.1, 0.3, 0.3, 0.8, 0.2, 0.95, 0.05])
    labels = torch.tensor([0, 0, 0, 0, 1, 0, 0, 1])  # D's defect shows in its second view only
    parts = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    evaluator = Evaluator(compute_pixel_metrics=False, part_ids=parts)
    order = torch.tensor([5, 0, 7, 2, 1, 6, 3, 4])  # batches out of order: positions find the parts
    for batch in order.split(3):
        evaluator.update(scores[batch], labels[batch], indices=batch)
    metrics = evaluator.compute()
    # part scores (max): A .9, B .3, C .8, D .95; labels (any): 0 0 1 1. Pairs: C>B, D>A, D>B; C<A: 3 of 4.
    assert metrics["sample_auroc"] == pytest.approx(0.75)
    # ranked D(+) A(-) C(+) B(-): precision 1 at D, 2/3 at C
    assert metrics["sample_aupr"] == pytest.approx((1 + 2 / 3) / 2)
    # per image: the defective .8 beats 4 of the 6 good views (not .9, .95), the defective .05 none
    assert metrics["image_auroc"] == pytest.approx((4 + 0) / 12)


def test_part_ids_need_the_positions_of_each_batch():
    evaluator = Evaluator(compute_pixel_metrics=False, part_ids=PARTS)
    with pytest.raises(ValueError, match="test-set positions"):
        evaluator.update(SCORES, LABELS)
