"""The feature cache changes no result: a run without it, a cold run and a warm run agree, for every method;
parallel jobs of a sweep share one cache."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from safetensors import safe_open

import anomaly
from anomaly.methods.efficientad.model import patch_description_network

pytestmark = pytest.mark.slow
SMALL_64 = ["dataset.image_size=64", "backbone=resnet18", "backbone.weights=null", "dataset.n_train=12",
            "dataset.calibration_fraction=0.25", "logger=none"]  # fmt: skip
TIMING_KEYS = ("fit_seconds", "calibration_seconds", "test_seconds", "peak_rss_mb")


def run(tmp_path: Path, name: str, overrides: list[str], cache_dir: Path) -> tuple[dict, dict, dict]:
    """anomaly-train's job in ``tmp_path/name`` with the cache in ``cache_dir``: (metrics without timings,
    run.json, the model file's tensors and metadata)."""
    output_dir = tmp_path / name
    cfg = anomaly.compose(overrides, output_dir=output_dir)
    with open_dict(cfg):
        cfg.paths.data_dir = str(tmp_path.parent / "shared-data")
        cfg.paths.results_db = None
        cfg.paths.cache_dir = str(cache_dir)
    metrics = anomaly.run(cfg).metrics
    record = json.loads((output_dir / "run.json").read_text())
    with safe_open(output_dir / "model.safetensors", "pt") as file:
        model = {"metadata": file.metadata(), **{key: file.get_tensor(key) for key in file.keys()}}  # noqa: SIM118
    return {k: v for k, v in metrics.items() if k not in TIMING_KEYS}, record, model


def assert_same_model(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]) if key == "metadata" else torch.equal(a[key], b[key]), key


METHODS = {
    "padim": ["method=padim", "method.model.n_features=40"],
    "patchcore": ["method=patchcore"],
    "patchcore_cross_fit": [
        "method=patchcore",
        "dataset.calibration_fraction=0",
        "threshold.source=cross_fit",
        "threshold.folds=2",
    ],
    # 9 training images in batches of 3: every epoch computes its images in batches of the same size
    "simplenet": ["method=simplenet", "method.max_epochs=3", "dataset.batch_size=3"],
}  # fmt: skip
TRAIN_IMAGES = 9  # 12, less the calibration fraction's 3


@pytest.mark.parametrize("method", list(METHODS))
def test_uncached_cold_and_warm_runs_give_the_same_metrics_thresholds_and_model(
    method, tmp_path, small_data_overrides
):
    overrides = [*small_data_overrides, *SMALL_64, *METHODS[method]]
    cache_dir = tmp_path / "cache"
    uncached = run(tmp_path, "uncached", [*overrides, "cache=false"], cache_dir)
    assert not cache_dir.exists() and uncached[1]["feature_cache"] is None
    cold = run(tmp_path, "cold", overrides, cache_dir)
    warm = run(tmp_path, "warm", overrides, cache_dir)
    for other in (cold, warm):
        assert other[0] == uncached[0]  # every metric, exactly
        assert other[1]["calibration"] == uncached[1]["calibration"]  # thresholds included
        assert_same_model(other[2], uncached[2])
    read_cold, computed_cold = cold[1]["feature_cache"].values()
    read_warm, computed_warm = warm[1]["feature_cache"].values()
    assert computed_warm == 0 and read_warm == read_cold + computed_cold > 0
    if method == "simplenet":  # the 2 epochs after the first read what the first computed
        assert read_cold == 2 * TRAIN_IMAGES
    else:
        assert read_cold == 0  # every image of a fit-once run is seen once per step (fit, calibration, test)


def test_simplenet_with_a_batch_of_one_stays_within_its_rounding(tmp_path, small_data_overrides):
    """Batches of 4 leave one image alone in each epoch, a different one each time: the backbone computes a
    batch of one with other kernels (resnet18 here: up to 1.4e-5 on features up to 10, against 0 between
    batches of 4 and 9), so later epochs read features that differ by that much from a recomputation.
    Cold and warm runs agree exactly; against the uncached run the metrics move by about 1e-4."""
    overrides = [*small_data_overrides, *SMALL_64, "method=simplenet", "method.max_epochs=3",
                 "dataset.batch_size=4"]  # fmt: skip
    cache_dir = tmp_path / "cache"
    uncached = run(tmp_path, "uncached", [*overrides, "cache=false"], cache_dir)
    cold = run(tmp_path, "cold", overrides, cache_dir)
    warm = run(tmp_path, "warm", overrides, cache_dir)
    assert warm[0] == cold[0] and warm[1]["calibration"] == cold[1]["calibration"]
    assert_same_model(warm[2], cold[2])
    assert cold[0].keys() == uncached[0].keys()
    for key, value in cold[0].items():
        assert value == pytest.approx(uncached[0][key], abs=1e-3), key


def test_efficientad_reads_its_teachers_outputs_and_runs_the_same(tmp_path, small_data_overrides):
    """The teacher's outputs on the unaugmented training images, computed for its channel statistics, are
    read by every training step (4 steps); the augmented autoencoder inputs are computed each step and never
    stored. Cold and warm runs give the uncached run's metrics, thresholds and model bit for bit (batches of
    3 over 9 training images: the statistics pass's batches are of the steps' size; the paper's batch of 1
    is the simpler case)."""
    batch_size = 3
    teacher = tmp_path / "teacher_small.pth"
    torch.manual_seed(0)
    torch.save(patch_description_network(384, "small").state_dict(), teacher)
    overrides = [*small_data_overrides, *SMALL_64, "method=efficientad", "method.max_steps=4",
                 f"method.model.teacher_weights={teacher}", f"dataset.batch_size={batch_size}"]  # fmt: skip
    cache_dir = tmp_path / "cache"
    uncached = run(tmp_path, "uncached", [*overrides, "cache=false"], cache_dir)
    cold = run(tmp_path, "cold", overrides, cache_dir)
    warm = run(tmp_path, "warm", overrides, cache_dir)
    for other in (cold, warm):
        assert other[0] == uncached[0] and other[1]["calibration"] == uncached[1]["calibration"]
        assert_same_model(other[2], uncached[2])
    read_cold, computed_cold = cold[1]["feature_cache"].values()
    assert read_cold == 4 * batch_size  # the training steps, on what the statistics pass computed
    assert warm[1]["feature_cache"] == {"images_read": read_cold + computed_cold, "images_computed": 0}
    assert len(list(cache_dir.glob("*/*.safetensors"))) == computed_cold  # no augmented image stored


@pytest.fixture
def one_thread():
    """Torch's threads as each of two parallel joblib jobs on 2 cores gets them (anomaly/cli/runtime.py),
    restored after the test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_parallel_joblib_sweep_shares_one_cache(tmp_path, small_data_overrides, one_thread):
    """Two seeds at once (hydra/launcher=joblib) write one cache; a run of each seed after them (in this
    process, with the jobs' one thread) reads every image it needs from it and gives its job's metrics."""
    cache_dir, data_dir = tmp_path / "cache", tmp_path.parent / "shared-data"
    overrides = [*small_data_overrides, *SMALL_64, "method=padim", "method.model.n_features=40"]
    sweep = [sys.executable, "-m", "anomaly.cli.train", "-m", *overrides, "seed=0,1", "hydra/launcher=joblib",
             "hydra.launcher.n_jobs=2", f"paths.cache_dir={cache_dir}", f"paths.data_dir={data_dir}",
             "paths.results_db=null", "hydra.sweep.dir=sweep"]  # fmt: skip
    done = subprocess.run(sweep, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = [json.loads(path.read_text()) for path in sorted((tmp_path / "sweep").glob("*/run.json"))]
    assert [job["seed"] for job in jobs] == [0, 1]
    assert sum(job["feature_cache"]["images_computed"] for job in jobs) > 0  # (the two raced for the images)
    for job in jobs:
        _, record, _ = run(tmp_path, f"again-{job['seed']}", [*overrides, f"seed={job['seed']}"], cache_dir)
        assert record["feature_cache"]["images_computed"] == 0 and record["feature_cache"]["images_read"] > 0
        assert record["metrics"] == job["metrics"]
