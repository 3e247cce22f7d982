"""End to end: anomaly-train on small generated data with the offline pretrained backbone."""

import json
from pathlib import Path

import pytest

from anomaly.data.synthetic import SyntheticAD
from anomaly.model_io import load_model
from anomaly.reports.database import read_runs

pytestmark = pytest.mark.slow  # commands and whole runs: seconds to a minute each


LOGGERS = {"padim": "wandb", "patchcore": "csv"}  # each run serves the tests of its logger too


@pytest.fixture(scope="module")
def trained(tmp_path_factory, run_training):
    """``trained(method)`` -> (metrics, run dir, its folder): one run per method, once per module."""
    runs: dict[str, tuple[dict, Path, Path]] = {}

    def train(method: str) -> tuple[dict, Path, Path]:
        if method not in runs:
            folder = tmp_path_factory.mktemp(method)
            runs[method] = (*run_training(folder, [f"method={method}", f"logger={LOGGERS[method]}"]), folder)
        return runs[method]

    return train


@pytest.mark.parametrize("method", ["padim", "patchcore"])
def test_method_detects_generated_defects_and_reloads_identically(method, trained, score_test_set):
    metrics, output_dir, folder = trained(method)
    assert metrics["image_auroc"] > 0.85, metrics
    assert metrics["pixel_auroc"] > 0.85, metrics
    assert metrics["pixel_aupro"] > 0.6, metrics
    assert json.loads((output_dir / "metrics.json").read_text())["image_auroc"] == metrics["image_auroc"]
    assert len(list((output_dir / "heatmaps").glob("*.png"))) == 8
    assert (output_dir / "config.yaml").is_file()
    [(record, run_dir)] = read_runs(folder / "runs.sqlite")  # appended to the results database
    assert run_dir == output_dir.resolve() and record.metrics["image_auroc"] == metrics["image_auroc"]

    # the saved model, rebuilt from its file alone, gives identical test metrics
    model = load_model(output_dir).model
    data = SyntheticAD(
        root=str(folder.parent / "shared-data" / "synthetic"), category="fabric", n_train=16, n_test_good=8,
        n_test_defect=12, generated_size=128, image_size=128, crop_size=None, batch_size=8, num_workers=0,
    )  # fmt: skip
    data.setup()
    reloaded = score_test_set(model, data)
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        assert reloaded[key] == pytest.approx(metrics[key], abs=1e-6)


def test_broken_scoring_is_caught(tmp_path, monkeypatch, run_training):
    """Negative control: the same run with inverted scores must fall far below the thresholds above."""
    from anomaly.methods.padim.model import Padim

    forward = Padim.forward
    monkeypatch.setattr(
        Padim, "forward", lambda self, x: type(forward(self, x))(*(-t for t in forward(self, x)))
    )
    metrics, _ = run_training(tmp_path, ["method=padim", "logger=none"])
    assert metrics["image_auroc"] < 0.3 and metrics["pixel_auroc"] < 0.3


def test_wandb_offline_run_is_written(trained):
    _, output_dir, _ = trained("padim")  # logger=wandb (LOGGERS)
    assert list((output_dir / "wandb").glob("offline-run-*")), "no offline wandb run written"


def test_the_embedded_default_calibrates_within_its_stated_budget(tmp_path, run_job):
    """The generated data's own calibration images (dataset.n_calibration, 300 by default) are enough for
    the default 1 % budget at 95 %: the run states a guarantee at or under it (here at 64 px, PaDiM)."""
    small = ["dataset.n_train=16", "dataset.n_test_good=4", "dataset.n_test_defect=4",
             "dataset.generated_size=64", "dataset.image_size=64", "dataset.num_workers=0",
             "trainer.enable_progress_bar=false"]  # fmt: skip
    _, output_dir = run_job(tmp_path, [*small, "method=padim", "logger=none"])
    calibration = json.loads((output_dir / "run.json").read_text())["calibration"]
    assert calibration["num_images"] == 300 and "the data set's own" in calibration["source"]
    assert calibration["guaranteed_rate"] <= calibration["false_alarm_rate"] == 0.01
    assert calibration["pixel_guaranteed_rate"] <= 0.01
