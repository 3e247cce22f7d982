"""One model for several categories (the unified protocol): the data module lists and tags each category,
refuses a bad category list or a size that would not batch, and the evaluation keeps each category's metrics
and their mean."""

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from anomaly.config import data_name, protocol
from anomaly.data.mvtec import MVTEC_CATEGORIES, MVTecAD
from anomaly.data.synthetic import CATEGORIES, SyntheticAD
from anomaly.errors import ConfigError, DataError
from anomaly.metrics import CategoryEvaluators, Evaluator, mean_over_categories


def write_category(root: Path, name: str, size: tuple[int, int], train: int = 3) -> None:
    """An MVTec AD category of ``size`` (width, height) images: ``train`` good, one good and one defective
    test image with its mask."""
    folder = root / name
    for i in range(train):
        (folder / "train" / "good").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (100 + i, 100, 100)).save(folder / "train" / "good" / f"{i:03d}.png")
    for kind in ("good", "crack"):
        (folder / "test" / kind).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (120, 100, 100)).save(folder / "test" / kind / "000.png")
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[2:6, 2:6] = 255
    (folder / "ground_truth" / "crack").mkdir(parents=True)
    Image.fromarray(mask).save(folder / "ground_truth" / "crack" / "000_mask.png")


@pytest.fixture
def two_sizes(tmp_path: Path) -> Path:
    """Two categories of different sizes and aspect ratios: wide 48x24, square 32x32."""
    write_category(tmp_path, "wide", (48, 24))
    write_category(tmp_path, "square", (32, 32), train=2)
    return tmp_path


def test_a_category_list_fits_on_the_union_and_tags_every_sample_with_its_category(two_sizes):
    data = MVTecAD(str(two_sizes), ["wide", "square"], image_size=[16, 16], crop_size=None, num_workers=0)
    data.setup()
    assert data.categories == ("wide", "square") and data.name == "wide+square"
    assert [s.category for s in data.train_samples] == ["wide"] * 3 + ["square"] * 2
    assert [(s.category, s.label) for s in data.test_samples] == [
        ("wide", 1), ("wide", 0), ("square", 1), ("square", 0)
    ]  # fmt: skip
    batch = next(iter(data.test_dataloader()))  # both sizes resized to one: the batch stacks
    assert batch["image"].shape == (4, 3, 16, 16) and batch["category"] == [
        "wide",
        "wide",
        "square",
        "square",
    ]
    assert "per category (train/test images): wide 3/2, square 2/2" in data.summary()


def test_one_category_is_the_plain_run_with_tagged_samples(two_sizes):
    data = MVTecAD(str(two_sizes), "wide", image_size=16, crop_size=None, num_workers=0)
    data.setup()
    assert data.categories is None and data.name == "wide"
    assert {s.category for s in data.train_samples + data.test_samples} == {"wide"}


def test_an_int_image_size_without_a_crop_is_refused_for_several_categories(two_sizes):
    """It keeps each image's aspect ratio: 48x24 and 32x32 images would not batch together."""
    with pytest.raises(ConfigError, match=r"one image size.*image_size=\[<height>,<width>\].*crop_size"):
        MVTecAD(str(two_sizes), ["wide", "square"], image_size=16, crop_size=None)
    data = MVTecAD(str(two_sizes), ["wide", "square"], image_size=16, crop_size=16, num_workers=0)
    data.setup()  # the shorter side to 16, then a centred 16x16 crop: one size
    assert next(iter(data.test_dataloader()))["image"].shape == (4, 3, 16, 16)


def test_a_missing_category_is_one_block_naming_it_the_available_ones_and_the_fix(two_sizes):
    data = MVTecAD(str(two_sizes), ["wide", "round", "oval"], image_size=[16, 16], crop_size=None)
    with pytest.raises(DataError) as error:
        data.setup()
    message = str(error.value)
    assert "'round', 'oval'" in message and "it holds: square, wide" in message
    assert "dataset.category=[wide]" in message and "dataset.category=all" in message


@pytest.mark.parametrize(
    ("category", "expected"),
    [([], r"dataset.category=\[\] names no category.*bottle"), (["wide", "wide"], "wide more than once"),
     ([3], "a category name, a list of names or all")],
)  # fmt: skip
def test_an_empty_or_repeating_category_list_is_refused(two_sizes, category, expected):
    with pytest.raises(ConfigError, match=expected):
        MVTecAD(str(two_sizes), category, image_size=[16, 16], crop_size=None)


def test_a_few_shot_run_over_several_categories_is_refused_with_the_fix(two_sizes):
    with pytest.raises(ConfigError, match=r"dataset.shots=2 with several categories.*category=a,b -m"):
        MVTecAD(str(two_sizes), ["wide", "square"], image_size=[16, 16], crop_size=None, shots=2)


def test_all_is_every_category_the_data_set_knows(tmp_path):
    assert MVTecAD(str(tmp_path), "all", image_size=[16, 16]).categories == MVTEC_CATEGORIES
    generated = SyntheticAD(str(tmp_path), "all", image_size=[16, 16], crop_size=None)
    assert generated.categories == CATEGORIES and generated.name == "all"


def test_the_run_is_named_and_recorded_by_its_categories():
    listed = OmegaConf.create({"dataset": {"category": ["fabric", "tile"]}})
    assert data_name(listed) == "fabric+tile" and protocol(listed) == "unified"
    assert protocol(OmegaConf.create({"dataset": {"category": "all"}})) == "unified"
    one = OmegaConf.create({"dataset": {"category": "fabric"}})
    assert data_name(one) == "fabric" and protocol(one) == "per-category"
    assert protocol(OmegaConf.create({"dataset": {"category": "fabric", "shots": 4}})) == "few-shot"


def category_batches(
    seed: int = 0,
) -> list[tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Three batches that mix two categories; maps [B, 1, 8, 8] scored higher on the masked squares."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for names in (["a", "a", "b"], ["b", "a", "b", "b"], ["a", "b"]):
        count = len(names)
        labels = torch.tensor([i % 2 for i in range(count)])
        masks = torch.zeros(count, 1, 8, 8, dtype=torch.uint8)
        masks[labels == 1, :, 2:5, 2:5] = 1
        maps = torch.rand(count, 1, 8, 8, generator=generator) + masks * torch.rand(1, generator=generator)
        batches.append((names, maps.amax(dim=(1, 2, 3)), labels, maps, masks))
    return batches


def test_each_category_is_evaluated_as_alone_and_the_mean_is_over_categories():
    unified = CategoryEvaluators(["a", "b"])
    alone = {"a": Evaluator(), "b": Evaluator()}
    for names, scores, labels, maps, masks in category_batches():
        unified.update(names, scores, labels, maps, masks)
        for category, evaluator in alone.items():
            rows = torch.tensor([name == category for name in names])
            evaluator.update(scores[rows], labels[rows], maps[rows], masks[rows])
    per_category = unified.compute(threshold=0.8, pixel_threshold=0.9)
    assert per_category == {category: e.compute(0.8, 0.9) for category, e in alone.items()}
    assert per_category["a"] != per_category["b"]
    mean = mean_over_categories(per_category)
    assert mean["image_auroc"] == pytest.approx(
        (per_category["a"]["image_auroc"] + per_category["b"]["image_auroc"]) / 2
    )
    assert mean["false_alarm_rate"] == pytest.approx(
        (per_category["a"]["false_alarm_rate"] + per_category["b"]["false_alarm_rate"]) / 2
    )
    assert mean["threshold"] == 0.8 and "image_f1_threshold" not in mean


def test_the_categories_share_one_exact_pixel_budget():
    """9 images of 64 pixels: within a limit of 600 every category is exact; at 500, although each category
    alone (256 and 320 pixels) is within it, both come from their histograms, with error bounds."""
    for limit, binned in ((600, False), (500, True)):
        unified = CategoryEvaluators(["a", "b"], exact_pixel_limit=limit, histogram_bins=1024)
        for batch in category_batches():
            unified.update(*batch)
        for metrics in unified.compute().values():
            assert ("pixel_aupro_max_error" in metrics) == binned and "pixel_aupro" in metrics
