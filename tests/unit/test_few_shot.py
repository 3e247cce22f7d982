"""Few-shot runs, without training: which k images are drawn (by the draw alone, nested over k), the bad
values refused before any work, the augmented views, and the reports' k × draws tables and learning curve
on hand-written run records."""

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly.cli.report import main as main_report
from anomaly.data.few_shot import draw_shots, shot_views
from anomaly.data.mvtec import MVTecAD
from anomaly.data.samples import Sample
from anomaly.errors import ConfigError, DataError
from anomaly.reports.database import append_run
from anomaly.reports.records import RunRecord
from anomaly.reports.sweep import write_reports

TRAIN = 10


@pytest.fixture
def tiny_mvtec(tmp_path) -> Path:
    """One category in MVTec AD's layout: 10 good training images (32 px), 2 good and 2 defective tests."""
    rng = np.random.default_rng(0)
    part = tmp_path / "part"
    for split, count in (("train/good", TRAIN), ("test/good", 2), ("test/dent", 2)):
        (part / split).mkdir(parents=True)
        for i in range(count):
            Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(
                part / split / f"{i:03d}.png"
            )
    (part / "ground_truth" / "dent").mkdir(parents=True)
    for i in range(2):
        mask = np.zeros((32, 32), np.uint8)
        mask[8:16, 8:16] = 255
        Image.fromarray(mask).save(part / "ground_truth" / "dent" / f"{i:03d}_mask.png")
    return tmp_path


def data(root: Path, **options) -> MVTecAD:
    module = MVTecAD(str(root), "part", image_size=32, crop_size=None, num_workers=0, batch_size=4, **options)
    module.setup()
    return module


def names(samples: list[Sample]) -> list[str]:
    return [sample.image_path.name for sample in samples]


def test_the_draw_alone_picks_the_k_images_nested_over_k_and_the_test_set_stays(tiny_mvtec, caplog):
    full = data(tiny_mvtec)
    with caplog.at_level(logging.INFO, logger="anomaly.data.datamodule"):
        drawn = data(tiny_mvtec, shots=3, shot_draw=1, seed=0)
    assert len(drawn.train_samples) == 3 and names(drawn.test_samples) == names(full.test_samples)
    assert names(data(tiny_mvtec, shots=3, shot_draw=1, seed=7).train_samples) == names(drawn.train_samples)
    assert names(data(tiny_mvtec, shots=3, shot_draw=2).train_samples) != names(drawn.train_samples)
    smaller = data(tiny_mvtec, shots=2, shot_draw=1).train_samples
    assert set(names(smaller)) < set(names(drawn.train_samples))  # nested: k = 2's images among k = 3's
    assert drawn.calibration_samples == [] and drawn.calibration_origin is None
    logged = caplog.text
    assert "Few-shot: 3 of 10 normal training images (dataset.shot_draw=1)" in logged
    assert all(str(sample.image_path) in logged for sample in drawn.train_samples)
    assert "few-shot: dataset.shots=3, draw 1" in logged


def test_shot_calibration_takes_the_same_undrawn_images_for_every_k(tiny_mvtec):
    a = data(tiny_mvtec, shots=2, shot_calibration=3, shot_draw=4)
    b = data(tiny_mvtec, shots=7, shot_calibration=3, shot_draw=4)
    assert names(a.calibration_samples) == names(b.calibration_samples) and len(a.calibration_samples) == 3
    assert not set(names(b.calibration_samples)) & set(names(b.train_samples))
    assert a.calibration_origin == "3 un-drawn training images (dataset.shot_calibration)"


def test_calibration_fraction_does_not_take_images_from_a_few_shot_run(tiny_mvtec, caplog):
    with caplog.at_level(logging.INFO, logger="anomaly.data.datamodule"):
        module = data(tiny_mvtec, shots=4, calibration_fraction=0.5)
    assert len(module.train_samples) == 4 and module.calibration_samples == []
    assert "calibration_fraction=0.5 does not apply to a few-shot run" in caplog.text


def test_only_the_drawn_training_images_are_read(tiny_mvtec):
    """A damaged image among the un-drawn ones does not stop a run that never uses it."""
    drawn = set(names(data(tiny_mvtec, shots=2).train_samples))
    undrawn = sorted({f"{i:03d}.png" for i in range(TRAIN)} - drawn)[0]
    (tiny_mvtec / "part" / "train" / "good" / undrawn).write_bytes(b"not a png")
    assert set(names(data(tiny_mvtec, shots=2).train_samples)) == drawn
    with pytest.raises(DataError, match=undrawn):
        data(tiny_mvtec)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"shots": 0}, r"dataset\.shots=0: .* k >= 1 .* positive int .* or null"),
        ({"shots": -2}, r"dataset\.shots=-2: .* positive int"),
        ({"shots": True}, r"dataset\.shots=True"),
        ({"shots": 2, "shot_draw": -1}, r"dataset\.shot_draw=-1: .* int >= 0"),
        (
            {"shot_calibration": 2},
            r"dataset\.shot_calibration=2 .* dataset\.shots is null: set dataset\.shots",
        ),
    ],
)
def test_bad_few_shot_values_are_refused_when_the_data_module_is_built(tiny_mvtec, options, message):
    with pytest.raises(ConfigError, match=message):
        MVTecAD(str(tiny_mvtec), "part", **options)


def test_more_shots_than_training_images_names_the_value_the_count_and_the_fix(tiny_mvtec):
    with pytest.raises(
        DataError, match=r"dataset\.shots=11 needs 11 .* part has 10: choose dataset\.shots <= 10"
    ):
        data(tiny_mvtec, shots=11)
    with pytest.raises(DataError, match=r"shots=8 plus dataset\.shot_calibration=3 .* dataset\.shots <= 7"):
        data(tiny_mvtec, shots=8, shot_calibration=3)


def test_draws_are_a_permutation_prefix_and_suffix():
    samples = [Sample(Path(f"{i}.png"), 0, None, "good") for i in range(20)]
    drawn, held = draw_shots(samples, 5, 3, 4, "x")
    assert len(drawn) == 5 and len(held) == 4 and not set(drawn) & set(held)
    assert drawn == sorted(drawn, key=samples.index)  # data-set order: fit-once methods fit in order
    assert draw_shots(samples, 5, 3, 4, "x") == (drawn, held)


def test_augmented_views_are_the_symmetries_of_the_square_or_the_four_that_keep_the_size(tiny_mvtec):
    image = torch.rand(3, 6, 6)
    square = [view(image) for view in shot_views(square=True)]
    expected = [torch.rot90(image, k, dims=(1, 2)) for k in range(4)]
    expected += [torch.rot90(image.flip(2), k, dims=(1, 2)) for k in range(4)]
    assert len(square) == 8 and all(torch.equal(a, b) for a, b in zip(square, expected, strict=True))
    wide = torch.rand(3, 4, 6)
    assert [tuple(view(wide).shape) for view in shot_views(square=False)] == [(3, 4, 6)] * 4

    module = data(tiny_mvtec, shots=2, shot_augment=True, train_in_order=True)  # 32 px, square: 8 views
    batches = list(module.train_dataloader())
    images = torch.cat([batch["image"] for batch in batches])
    assert images.shape[0] == 2 * 8 == module.training_image_count()
    assert torch.equal(images[1], torch.rot90(images[0], 1, dims=(1, 2)))
    assert torch.equal(images[4], images[0].flip(2))


# --- reports ------------------------------------------------------------------------------------------


def fake(
    sweep: Path, name: str, auroc: float, shots: int | None, draw: int = 0, method: str = "padim",
    dataset: str = "synthetic",
) -> None:  # fmt: skip
    record = RunRecord(
        method=method, backbone="resnet18", dataset=dataset, category="fabric", seed=0, status="ok",
        metrics={"image_auroc": auroc, "pixel_auroc": 0.9, "pixel_aupro": 0.8, "image_f1_max": 0.7},
        protocol="few-shot" if shots else "per-category", shots=shots,
        shot_draw=None if shots is None else draw,
    )  # fmt: skip
    record.write(sweep / name)


def test_the_reports_give_per_k_the_mean_and_std_over_draws_beside_the_all_images_run(tmp_path):
    for draw, (one, two) in enumerate([(0.70, 0.80), (0.74, 0.86)]):
        fake(tmp_path, f"k1_d{draw}", one, 1, draw)
        fake(tmp_path, f"k2_d{draw}", two, 2, draw)
    fake(tmp_path, "all", 0.95, None)
    rows, _, plots = write_reports(tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    few_shot = summary.split("## few-shot image_auroc:")[1].split("\n## ")[0]
    assert "| category | method | k=1 | k=2 | all images |" in few_shot
    assert "| fabric | padim (resnet18) | 72.0 ± 2.8 | 83.0 ± 4.2 | 95.0 |" in few_shot
    assert "## image_auroc:" in summary  # the run on all images keeps its own table
    assert (tmp_path / "plots" / "learning_curve_image_auroc.png") in plots
    with (tmp_path / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert {(r["protocol"], r["shots"], r["shot_draw"]) for r in table} == {
        ("few-shot", "1", "0"), ("few-shot", "1", "1"), ("few-shot", "2", "0"), ("few-shot", "2", "1"),
        ("per-category", "", ""),
    }  # fmt: skip
    assert "Few-shot" in (tmp_path / "report.html").read_text() and len(rows) == 5


def test_a_few_shot_summary_cites_no_published_numbers_it_does_not_show(tmp_path):
    """paper_results.yaml holds no few-shot values: a sweep of few-shot runs only names no paper."""
    fake(tmp_path, "k1", 0.9, 1, method="patchcore", dataset="mvtec")
    write_reports(tmp_path)
    assert "Published numbers" not in (tmp_path / "summary.md").read_text()


def test_a_record_written_before_the_protocols_still_loads(tmp_path):
    record = RunRecord("padim", None, "mvtec", "bottle", 0, "ok")
    old = {key: value for key, value in json.loads(json.dumps(record.__dict__)).items()
           if key not in ("protocol", "shots", "shot_draw", "shot_files", "threshold_note")}  # fmt: skip
    (tmp_path / "run.json").write_text(json.dumps(old))
    loaded = RunRecord.read(tmp_path)
    assert loaded.protocol == "per-category" and loaded.shots is None and loaded.shot_files == []


def test_anomaly_report_shows_the_few_shot_runs_apart_from_the_runs_on_all_images(tmp_path):
    """The overview across data sets holds the runs on all images only: a k = 1 run is no sample of them."""
    sweep = tmp_path / "sweep"
    fake(sweep, "k1", 0.60, 1)
    fake(sweep, "k1_d1", 0.64, 1, draw=1)
    fake(sweep, "all", 0.95, None)
    database = tmp_path / "runs.sqlite"
    for run_dir in sorted(sweep.iterdir()):
        append_run(database, RunRecord.read(run_dir), run_dir)
    assert main_report([str(database), "--out", str(tmp_path / "report")]) == 0
    out = tmp_path / "report"
    assert {path.name for path in out.glob("*.md")} == {
        "overview.md",
        "synthetic.md",
        "synthetic-few-shot.md",
    }
    assert "| padim (resnet18) | 95.0 |" in (out / "overview.md").read_text()
    few_shot = (out / "synthetic-few-shot.md").read_text()
    assert "| fabric | padim (resnet18) | 62.0 ± 2.8 | 95.0 |" in few_shot
    assert (out / "plots" / "synthetic-few-shot" / "learning_curve_image_auroc.png").is_file()
    assert "id='synthetic-few-shot'" in (out / "index.html").read_text()
