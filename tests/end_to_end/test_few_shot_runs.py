"""Few-shot runs end to end on small generated data (64 px, random resnet18): a k-shot run fits on exactly
its k images and says why it has no threshold; every method runs on one image (EfficientAD with held-out
normal images to normalise on, and refused up front without); a Hydra sweep of 2 k × 2 draws gives the
mean ± std table and the learning curve, reading the test set's features from the cache after its first
run; a bad value is one clear block from the command."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from anomaly.errors import ConfigError
from anomaly.methods.efficientad.model import patch_description_network

pytestmark = pytest.mark.slow
SMALL_64 = ["dataset.image_size=64", "backbone=resnet18", "backbone.weights=null", "logger=none"]
TEST_IMAGES = 20  # the small data's 8 good and 12 defective test images


def record_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def test_a_k_shot_run_fits_on_exactly_k_images_records_them_and_says_why_it_has_no_threshold(
    tmp_path, run_training
):
    metrics, run_dir = run_training(tmp_path, [*SMALL_64, "method=padim", "dataset.shots=3",
                                               "dataset.shot_draw=1", "seed=5"])  # fmt: skip
    with safe_open(run_dir / "model.safetensors", "pt") as model:
        assert int(model.get_tensor("count")) == 3  # PaDiM's statistics are over exactly the 3 images
    record = record_of(run_dir)
    assert (record["protocol"], record["shots"], record["shot_draw"]) == ("few-shot", 3, 1)
    assert len(record["shot_files"]) == 3 and all(Path(f).parent.name == "good" for f in record["shot_files"])
    assert 0.0 <= metrics["image_auroc"] <= 1.0  # the whole test set is scored
    # k = 3 < threshold.folds = 5 and no held-out normal images: no threshold, and run.json says why
    assert "threshold" not in metrics and record["calibration"] is None
    assert "besides its k=3" in record["threshold_note"] and "shot_calibration" in record["threshold_note"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "teacher_small.pth"
    torch.manual_seed(0)
    torch.save(patch_description_network(384, "small").state_dict(), path)
    return path


ONE_SHOT = {  # each method's smallest k is 1 (docs/methods.md); short training for the trained ones
    "padim": ["method=padim"],
    "patchcore": ["method=patchcore"],
    "simplenet": ["method=simplenet", "method.max_epochs=2"],  # a batch of 8 > k: one step per epoch
    "efficientad": ["method=efficientad", "method.max_steps=2", "dataset.n_calibration=4"],
}


@pytest.mark.parametrize("method", list(ONE_SHOT))
def test_every_method_runs_on_one_image(method, tmp_path, run_training, teacher):
    overrides = [*SMALL_64, *ONE_SHOT[method], "dataset.shots=1"]
    overrides += [f"method.model.teacher_weights={teacher}"] if method == "efficientad" else []
    metrics, run_dir = run_training(tmp_path, overrides)
    record = record_of(run_dir)
    assert record["status"] == "ok" and len(record["shot_files"]) == 1
    assert 0.0 <= metrics["image_auroc"] <= 1.0
    if method == "efficientad":  # 2 generated held-out normals normalise, the other 2 calibrate
        assert record["calibration"]["num_images"] == 2


def test_augmented_shots_are_fitted_in_their_eight_views(tmp_path, run_training):
    _, run_dir = run_training(tmp_path, [*SMALL_64, "method=padim", "dataset.shots=2",
                                         "dataset.shot_augment=true"])  # fmt: skip
    with safe_open(run_dir / "model.safetensors", "pt") as model:
        assert int(model.get_tensor("count")) == 2 * 8  # the generated images are square
    assert "no cross-fit with dataset.shot_augment=true" in record_of(run_dir)["threshold_note"]


def test_efficientad_without_held_out_normal_images_is_refused_before_training(
    tmp_path, run_training, teacher
):
    """It normalises its maps on normal images it did not train on: a k-shot run has none of its own."""
    overrides = [
        *SMALL_64,
        "method=efficientad",
        f"method.model.teacher_weights={teacher}",
        "dataset.shots=2",
    ]
    with pytest.raises(ConfigError, match=r"efficientad normalises .* dataset\.shot_calibration=<n>"):
        run_training(tmp_path, overrides)
    assert record_of(tmp_path / "run")["status"] == "failed"
    assert not (tmp_path / "run" / "model.safetensors").exists()


def anomaly_train(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "anomaly.cli.train", *overrides]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_a_sweep_of_two_k_and_two_draws_gives_mean_and_std_per_k_and_the_learning_curve(
    tmp_path, small_data_overrides
):
    """The all-images column beside it: tests/unit/test_few_shot.py, on hand-written records."""
    sweep = tmp_path / "sweep"
    done = anomaly_train(
        tmp_path, "-m", *small_data_overrides, *SMALL_64, "experiment=fewshot_synthetic", "method=padim",
        "dataset.shots=1,2", "dataset.shot_draw=0,1", f"hydra.sweep.dir={sweep}",
        "hydra.sweep.subdir=k${dataset.shots}_d${dataset.shot_draw}", f"paths.data_dir={tmp_path / 'data'}",
        f"paths.cache_dir={tmp_path / 'cache'}", "paths.results_db=null",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    summary = (sweep / "summary.md").read_text()
    table = summary.split("## few-shot image_auroc:")[1].split("\n## ")[0]
    assert "| category | method | k=1 | k=2 | all images |" in table
    row = next(line for line in table.splitlines() if line.startswith("| fabric |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == "padim (resnet18)" and all(" ± " in cell for cell in cells[2:4])
    assert (sweep / "plots" / "learning_curve_image_auroc.png").stat().st_size > 1000
    assert "Few-shot" in (sweep / "report.html").read_text()
    with (sweep / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["shots"], r["shot_draw"]) for r in rows) == [
        ("1", "0"),
        ("1", "1"),
        ("2", "0"),
        ("2", "1"),
    ]

    # the test set's features are computed once: every run after the first reads them from the cache
    records = [record_of(path.parent) for path in sweep.glob("*/run.json")]
    reads = sorted(record["feature_cache"]["images_read"] for record in records)
    assert reads[0] < TEST_IMAGES <= reads[1]


def test_a_bad_shots_value_is_one_clear_block(tmp_path, command_in_process):
    """anomaly-train's main() in this process (the sweep above runs the command as a process)."""
    overrides = ["dataset.shots=0", "logger=none", f"paths.data_dir={tmp_path / 'data'}"]
    done = command_in_process("train", *overrides, cwd=tmp_path)
    assert done.returncode != 0
    assert "dataset.shots=0" in done.stderr and "null for all training images" in done.stderr
    assert "Traceback" not in done.stderr
