"""One model for several categories (the unified protocol), end to end on three generated categories: every
method reports each category's metrics and their mean, and its model loads for prediction; PatchCore's
unified fit on two processes is one process's bank; a category list naming a missing category is one block
before any work; a sweep report shows a unified run beside the runs of a model per category."""

import json
import os
import subprocess
import sys
from pathlib import Path
from statistics import mean

import numpy as np
import pytest
import torch
from omegaconf import open_dict
from PIL import Image
from safetensors.torch import load_file

import anomaly
from anomaly.errors import DataError
from anomaly.methods.efficientad.model import patch_description_network
from anomaly.metrics import Evaluator
from anomaly.reports.records import RunRecord
from anomaly.reports.sweep import write_reports

pytestmark = pytest.mark.slow  # whole runs: seconds each

CATEGORIES = ["fabric", "tile", "washer"]
UNIFIED = [
    f"dataset.category=[{','.join(CATEGORIES)}]", "dataset.image_size=[64,64]", "dataset.generated_size=64",
    "dataset.n_train=6", "dataset.n_test_good=2", "dataset.n_test_defect=2", "dataset.n_calibration=0",
    "dataset.calibration_fraction=0.2", "dataset.num_workers=0", "dataset.batch_size=4", "backbone=resnet18",
    "backbone.weights=null", "logger=none", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
]  # fmt: skip
CALIBRATION_IMAGES = round(0.2 * 6 * len(CATEGORIES))  # a seeded share of the union's training images
METHODS = {
    "padim": ["method=padim", "method.model.n_features=40"],
    "patchcore": ["method=patchcore"],
    "simplenet": ["method=simplenet", "method.max_epochs=1", "dataset.batch_size=4"],
    "efficientad": ["method=efficientad", "method.max_steps=2", "dataset.batch_size=1"],
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The generated categories of this module's runs (generated once, by the first run)."""
    return tmp_path_factory.mktemp("unified-data")


def run(tmp_path: Path, data_dir: Path, overrides: list[str]) -> tuple[dict, Path]:
    """anomaly-train's job in ``tmp_path/run``: (metrics, run dir)."""
    output_dir = tmp_path / "run"
    cfg = anomaly.compose(overrides, output_dir=output_dir)
    with open_dict(cfg):
        cfg.paths.data_dir = str(data_dir)
        cfg.paths.results_db = None
        cfg.paths.cache_dir = str(tmp_path / "cache")
    return anomaly.run(cfg).metrics, output_dir


@pytest.mark.filterwarnings("ignore:backbone .* is randomly initialised")
@pytest.mark.parametrize("method", list(METHODS))
def test_a_unified_run_reports_each_categorys_metrics_and_their_mean(method, data_dir, tmp_path):
    overrides = [*UNIFIED, *METHODS[method]]
    if method == "efficientad":
        torch.manual_seed(0)
        torch.save(patch_description_network(384, "small").state_dict(), tmp_path / "teacher.pth")
        overrides.append(f"method.model.teacher_weights={tmp_path / 'teacher.pth'}")
    metrics, run_dir = run(tmp_path, data_dir, overrides)
    written = json.loads((run_dir / "metrics.json").read_text())
    per_category = written["categories"]
    assert list(per_category) == CATEGORIES
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro", "false_alarm_rate", "recall_at_threshold"):
        assert metrics[key] == pytest.approx(mean(per_category[c][key] for c in CATEGORIES)) == written[key]
        assert all(0.0 <= per_category[c][key] <= 1.0 for c in CATEGORIES)
    assert len({json.dumps(per_category[c], sort_keys=True) for c in CATEGORIES}) == 3  # each its own images
    # one calibration over the union: the one threshold at which each category's false alarms are counted
    assert {per_category[c]["threshold"] for c in CATEGORIES} == {written["calibration"]["threshold"]}
    assert written["calibration"]["num_images"] == CALIBRATION_IMAGES // (2 if method == "efficientad" else 1)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["protocol"] == "unified" and record["category"] == "fabric+tile+washer"
    assert (
        record["category_metrics"] == per_category
        and record["metrics"]["image_auroc"] == metrics["image_auroc"]
    )
    assert run_dir.joinpath("model.safetensors").is_file()
    if method == "padim":
        assert_fitted_on_the_union_and_loads_for_prediction(run_dir, data_dir, per_category)


def assert_fitted_on_the_union_and_loads_for_prediction(
    run_dir: Path, data_dir: Path, per_category: dict
) -> None:
    """PaDiM's statistics count every training image of the three categories but the calibration ones; the
    model file loads as any other (``anomaly.load``) and scores each category's test images to the image
    AUROC the run reported for it."""
    assert int(load_file(str(run_dir / "model.safetensors"))["count"]) == 6 * 3 - CALIBRATION_IMAGES
    detector = anomaly.load(run_dir, device="cpu")
    for category in CATEGORIES:
        paths = sorted((data_dir / "synthetic" / category / "test").glob("*/*.png"))
        labels = torch.tensor([int(path.parent.name != "good") for path in paths])
        evaluator = Evaluator(compute_pixel_metrics=False)
        evaluator.update(detector.score(paths).scores, labels)
        assert evaluator.compute()["image_auroc"] == pytest.approx(
            per_category[category]["image_auroc"], abs=1e-6
        )


def test_a_missing_category_is_one_block_before_any_work(data_dir, tmp_path):
    with pytest.raises(DataError) as error:
        run(tmp_path, data_dir, [*UNIFIED, "method=padim", "dataset.category=[fabric,carpet]"])
    message = str(error.value)
    assert "names 'carpet'" in message and "fabric, tile, washer, specks" in message
    assert "dataset.category=[fabric]" in message and "dataset.category=all" in message
    assert not (tmp_path / "run" / "model.safetensors").exists()


def environment() -> dict[str, str]:
    """The test's environment without the variables that would make a child think it is a rank already."""
    skip = {"HYDRA_FULL_ERROR", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"}
    return {key: value for key, value in os.environ.items() if key not in skip} | {"OMP_NUM_THREADS": "1"}


def test_patchcores_unified_bank_on_two_processes_is_one_processs(data_dir, tmp_path):
    """Through the bounded-memory fit (the spill file, the coreset over every rank's rows): the union's 14
    training images (18 less the calibration share) in two blocks of 7, each spanning categories."""
    results = {}
    for name, layout in {"one": [], "two": ["trainer=ddp", "trainer.devices=2"]}.items():
        paths = [
            f"paths.data_dir={data_dir}",
            "paths.results_db=null",
            f"paths.cache_dir={tmp_path / 'cache'}",
        ]
        arguments = [*UNIFIED, "method=patchcore", *paths, f"hydra.run.dir={tmp_path / name}", *layout]
        done = subprocess.run([sys.executable, "-m", "anomaly.cli.train", *arguments], cwd=tmp_path,
                              env=environment(), capture_output=True, text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        bank = load_file(str(tmp_path / name / "model.safetensors"))["memory_bank"]
        results[name] = (bank, json.loads((tmp_path / name / "metrics.json").read_text()))
    (bank_one, one), (bank_two, two) = results["one"], results["two"]
    assert torch.equal(bank_one, bank_two) and len(bank_one) > 0  # the same coreset, row for row
    assert list(one["categories"]) == list(two["categories"]) == CATEGORIES
    for category in CATEGORIES:
        for key, value in one["categories"][category].items():
            assert two["categories"][category][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (
                category,
                key,
            )


def fake_record(sweep: Path, name: str, category: str, metrics: dict, **fields) -> None:
    record = RunRecord(method="patchcore", backbone="wide_resnet50_2", dataset="mvtec", category=category,
                       seed=0, status="ok", metrics=metrics, **fields)  # fmt: skip
    record.write(sweep / name)


def test_a_sweep_report_shows_a_unified_run_beside_the_runs_of_a_model_per_category(tmp_path):
    """A row per category of the unified run, in a column beside the per-category models' of the same method;
    the paper's numbers (a model per category) beside those only."""
    sweep = tmp_path / "sweep"
    separate = {"bottle": 0.9, "carpet": 0.8, "grid": 0.7}
    for category, value in separate.items():
        fake_record(sweep, category, category, {"image_auroc": value})
    unified = {"bottle": {"image_auroc": 0.85}, "carpet": {"image_auroc": 0.75}, "grid": {"image_auroc": 0.6}}
    fake_record(sweep, "unified", "bottle+carpet+grid", {"image_auroc": 0.7333}, protocol="unified",
                category_metrics=unified)  # fmt: skip
    rows, tables, _ = write_reports(sweep)
    assert len(rows) == 6 and {row["protocol"] for row in rows} == {"per-category", "unified"}
    header, body = next(table for metric, table in tables.items() if metric.key == "image_auroc")
    label = "patchcore (wide_resnet50_2)"
    assert header == ["category", label, "patchcore paper", "Δ", f"{label} · unified"]
    assert body == [
        ["bottle", "90.0", "100.0", "-10.0", "85.0"],
        ["carpet", "80.0", "98.7", "-18.7", "75.0"],
        ["grid", "70.0", "97.9", "-27.9", "60.0"],
        ["mean", "80.0", "98.9", "-18.9", "73.3"],
    ]
    summary = (sweep / "summary.md").read_text()
    assert f"| category | {label} | patchcore paper | Δ | {label} · unified |" in summary
    csv_rows = (sweep / "results.csv").read_text().splitlines()
    assert sum(",unified,mvtec," in line for line in csv_rows) == 3


def test_the_documented_resize_rule_holds_for_categories_of_other_sizes(tmp_path):
    """Images of 48x24 and 32x32 in one unified run resized exactly to dataset.image_size=[h, w]: one model,
    maps of that size for both (docs/benchmarks.md, Protocols)."""
    for name, size in (("wide", (48, 24)), ("square", (32, 32))):
        for split in ("train/good", "test/good", "test/hole", "ground_truth/hole"):
            folder = tmp_path / "data" / name / split
            folder.mkdir(parents=True)
            for i in range(4 if split == "train/good" else 2):
                if split.startswith("ground_truth"):
                    mask = np.zeros(size[::-1], np.uint8)
                    mask[4:12, 4:12] = 255
                    Image.fromarray(mask).save(folder / f"{i:03d}_mask.png")
                else:
                    Image.new("RGB", size, (90 + 20 * i, 100, 110)).save(folder / f"{i:03d}.png")
    overrides = ["dataset=mvtec", f"dataset.root={tmp_path / 'data'}", "dataset.category=[wide,square]",
                 "dataset.image_size=[32,32]", "dataset.crop_size=null", "dataset.num_workers=0",
                 "method=padim", "backbone=resnet18", "backbone.weights=null", "logger=none",
                 "threshold.source=none", "trainer.enable_progress_bar=false"]  # fmt: skip
    cfg = anomaly.compose(overrides, output_dir=tmp_path / "run")
    with open_dict(cfg):
        cfg.paths.results_db = None
        cfg.paths.cache_dir = str(tmp_path / "cache")
    with pytest.warns(UserWarning, match="randomly initialised"):
        result = anomaly.run(cfg)
    assert list(result.record.category_metrics) == ["wide", "square"]
    assert all("pixel_aupro" in metrics for metrics in result.record.category_metrics.values())
    assert {example["anomaly_map"].shape for example in result.examples} == {(1, 32, 32)}
