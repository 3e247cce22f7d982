"""Per-sample image scores: one score and one label per physical part, from the images that show it.

Real-IAD photographs every part with five cameras and reports its image metrics per part as well as per
image ("S-AUROC"): a part is defective when any of its views is, and its score is the maximum over its
views. This is the rule of the data set's official evaluation (ADEval, ``--sample_key_pat``: the maximum of
the views' scores and of their labels), which the Real-IAD repository (Tencent/AnomalyDetection_Real-IAD)
runs for its tables.
"""

import torch
from torch import Tensor


def per_sample(scores: Tensor, labels: Tensor, part_ids: Tensor) -> tuple[Tensor, Tensor]:
    """``(part_scores [P], part_labels [P])`` from ``scores [N]`` float, ``labels [N]`` 0/1 and the
    ``part_ids [N]`` int of each image: per part the maximum score of its views, and defective (True) when
    any view is. Parts in increasing id order."""
    if not scores.shape == labels.shape == part_ids.shape or scores.ndim != 1:
        raise ValueError(
            f"expected scores, labels and part ids of one shape [N], got {tuple(scores.shape)}, "
            f"{tuple(labels.shape)} and {tuple(part_ids.shape)}"
        )
    ids, part_of = torch.unique(part_ids, return_inverse=True)
    part_scores = torch.full((len(ids),), -torch.inf, dtype=scores.dtype)
    part_scores.scatter_reduce_(0, part_of, scores, reduce="amax")
    part_labels = torch.zeros(len(ids), dtype=torch.int64)
    part_labels.scatter_reduce_(0, part_of, labels.to(torch.int64), reduce="amax")
    return part_scores, part_labels.bool()
