"""Every method on two processes (Lightning DDP, gloo on CPU): the fit-once methods fit exactly what one
process fits, the trained ones train data-parallel, every test image is scored once and the metrics are
over all of them; a 2-"node" torchrun on localhost gives the same PatchCore bank; a user error is one
block, printed once, and every process ends."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import anomaly
from anomaly.methods.efficientad.model import patch_description_network

pytestmark = pytest.mark.slow  # commands and whole runs: seconds to a minute each

FAST = ["logger=none", "trainer.enable_progress_bar=false", "paths.results_db=null",
        "trainer.accelerator=cpu"]  # fmt: skip
TWO_PROCESSES = ["trainer=ddp", "trainer.devices=2"]
TIMEOUT = 600


def environment() -> dict[str, str]:
    """The test's environment without the variables that would make a child think it is a rank already."""
    skip = {"HYDRA_FULL_ERROR", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK"}
    return {key: value for key, value in os.environ.items() if key not in skip} | {"OMP_NUM_THREADS": "1"}


def train(run_dir: Path, data_dir: Path, small: list[str], *overrides: str) -> subprocess.CompletedProcess:
    arguments = [*FAST, *small, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.run([sys.executable, "-m", "anomaly.cli.train", *arguments], cwd=run_dir.parent,
                          env=environment(), capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip


def finished(result: subprocess.CompletedProcess, run_dir: Path) -> tuple[dict, dict]:
    """(metrics.json, the model file's tensors) of a run that must have succeeded."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return metrics, load_file(str(run_dir / "model.safetensors"))


def assert_same_metrics(one: dict, two: dict, threshold_rel: float = 1e-5) -> None:
    """Rates within 1e-6; scores (thresholds) to float32 rounding of the fitted statistics (relative
    ``threshold_rel``); rates at such a threshold within 1e-4, as a threshold that moves by float32 rounding
    may flip a few of the ~300k test pixels (measured: 8e-6 for PaDiM's pixel F1 at its threshold)."""
    quality = [key for key in one if key.startswith(("image_", "pixel_")) and isinstance(one[key], float)]
    assert len(quality) >= 4, one
    for key in quality:
        if key.endswith("_at_threshold"):
            assert abs(one[key] - two[key]) <= 1e-4, (key, one[key], two[key])
        elif "threshold" in key:
            assert one[key] == pytest.approx(two[key], rel=threshold_rel), key
        else:
            assert abs(one[key] - two[key]) <= 1e-6, (key, one[key], two[key])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ddp-data")


@pytest.fixture(scope="module")
def small(small_data_overrides) -> list[str]:
    """Small generated data, an image count that does not split evenly over two ranks."""
    return [*small_data_overrides, "dataset.n_train=17", "dataset.n_test_good=7", "dataset.batch_size=4"]


@pytest.fixture(scope="module")
def one_process(small, data_dir, tmp_path_factory):
    """``one_process(method, *overrides)`` -> (metrics.json, model tensors, run dir) of the one-process run
    of a fit-once method: the reference of every multi-process run here, fitted once per module, by
    anomaly-train's job in this process (no interpreter to start) with one torch thread, as each rank has
    (environment())."""
    runs: dict[tuple[str, ...], tuple[dict, dict, Path]] = {}

    def get(method: str, *overrides: str) -> tuple[dict, dict, Path]:
        key = (method, *overrides)
        if key not in runs:
            run_dir = tmp_path_factory.mktemp(f"one-{method}") / "run"
            paths = [f"paths.data_dir={data_dir}", f"paths.cache_dir={run_dir.parent / 'cache'}"]
            arguments = [*FAST, *small, *paths, f"method={method}", *overrides]
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                anomaly.run(anomaly.compose(arguments, output_dir=run_dir))
            finally:
                torch.set_num_threads(threads)
            metrics = json.loads((run_dir / "metrics.json").read_text())
            runs[key] = (metrics, load_file(str(run_dir / "model.safetensors")), run_dir)
        return runs[key]

    return get


@pytest.mark.parametrize("method", ["padim", "patchcore"])
def test_a_fit_once_method_on_two_processes_fits_what_one_fits(
    method, one_process, small, data_dir, tmp_path
):
    one = one_process(method)
    two = finished(train(tmp_path / "two", data_dir, small, f"method={method}", *TWO_PROCESSES),
                   tmp_path / "two")  # fmt: skip
    if method == "padim":  # the same statistics up to float32 rounding (each rank sums its own images)
        for key in ("mean", "covariance"):
            scale = float(one[1][key].abs().max())
            torch.testing.assert_close(one[1][key], two[1][key], rtol=1e-5, atol=1e-5 * scale)
        assert int(one[1]["count"]) == int(two[1]["count"]) == round(17 * 0.9)  # every training image once
    else:
        assert torch.equal(one[1]["memory_bank"], two[1]["memory_bank"])  # the same coreset, row for row
    assert_same_metrics(one[0], two[0])
    records = [json.loads((run_dir / "run.json").read_text()) for run_dir in (one[2], tmp_path / "two")]
    examples = [record["sample_images"] for record in records]  # found by the position each batch carries
    assert examples[0] == examples[1] and len(examples[0]) > 1
    calibration_one, calibration_two = one[0]["calibration"], two[0]["calibration"]
    assert calibration_one["num_images"] == calibration_two["num_images"]  # each held-out image once
    assert calibration_one["threshold"] == pytest.approx(calibration_two["threshold"], rel=1e-5)


def test_a_few_shot_run_on_two_processes_fits_the_same_k_images_as_one(
    one_process, small, data_dir, tmp_path
):
    """k = 3 does not split evenly over two ranks: each drawn image is fitted once, none padded in twice, and
    the 2 un-drawn calibration images are each scored once. The covariance of 3 images is singular but for
    its ε·I, and its inverse magnifies the float32 rounding of the ranks' own sums: thresholds to 1e-4
    (measured: 1.1e-5 for the calibrated threshold, 5e-7 for the F1-max one; 15 images stay within 1e-5)."""
    shots = ["dataset.shots=3", "dataset.shot_draw=1", "dataset.shot_calibration=2"]
    one = one_process("padim", *shots)
    two = finished(train(tmp_path / "two", data_dir, small, "method=padim", *shots, *TWO_PROCESSES),
                   tmp_path / "two")  # fmt: skip
    assert int(one[1]["count"]) == int(two[1]["count"]) == 3
    for key in ("mean", "covariance"):
        scale = float(one[1][key].abs().max())
        torch.testing.assert_close(one[1][key], two[1][key], rtol=1e-5, atol=1e-5 * scale)
    records = [json.loads((run_dir / "run.json").read_text()) for run_dir in (one[2], tmp_path / "two")]
    assert len(records[0]["shot_files"]) == 3 and records[0]["shot_files"] == records[1]["shot_files"]
    assert_same_metrics(one[0], two[0], threshold_rel=1e-4)
    calibration_one, calibration_two = one[0]["calibration"], two[0]["calibration"]
    assert calibration_one["num_images"] == calibration_two["num_images"] == 2
    assert calibration_one["threshold"] == pytest.approx(calibration_two["threshold"], rel=1e-4)


def test_trained_methods_train_data_parallel_on_two_processes(small, data_dir, tmp_path):
    teacher = tmp_path / "teacher_small.pth"
    torch.manual_seed(0)
    torch.save(patch_description_network(384, "small").state_dict(), teacher)
    # 4 of 17 images held out: 2 normalise EfficientAD's maps, 2 calibrate (one of each per process)
    efficientad = ["method=efficientad", f"method.model.teacher_weights={teacher}", "method.max_steps=6",
                   "dataset.image_size=[64,64]", "dataset.calibration_fraction=0.25"]  # fmt: skip
    simplenet = ["method=simplenet", "method.max_epochs=2", "dataset.image_size=[64,64]"]
    runs = {"simplenet": simplenet, "efficientad": efficientad}
    for name, overrides in runs.items():
        metrics, _ = finished(train(tmp_path / name, data_dir, small, *overrides, *TWO_PROCESSES),
                              tmp_path / name)  # fmt: skip
        assert 0.0 <= metrics["image_auroc"] <= 1.0 and metrics["calibration"]["num_images"] >= 1, name


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_by_torchrun_give_the_same_patchcore_bank(one_process, small, data_dir, tmp_path):
    one = one_process("patchcore")
    run_dir, port = tmp_path / "nodes", free_port()
    arguments = [*FAST, *small, f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}", "method=patchcore",
                 "trainer=ddp", "trainer.devices=1", "trainer.num_nodes=2"]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                "--master-addr=127.0.0.1", f"--master-port={port}"]  # fmt: skip
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "env": environment()}
    commands = [[*torchrun, f"--node-rank={node}", "-m", "anomaly.cli.train", *arguments] for node in (0, 1)]
    nodes = [subprocess.Popen(command, cwd=tmp_path, **pipes) for command in commands]
    outputs = [node.communicate(timeout=TIMEOUT) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, stdout[-3000:] + stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    tensors = load_file(str(run_dir / "model.safetensors"))
    assert torch.equal(one[1]["memory_bank"], tensors["memory_bank"])
    assert_same_metrics(one[0], metrics)


def test_a_user_error_on_two_processes_is_one_block_once(small, data_dir, tmp_path):
    """An AUPRO limit above 1 is refused before any work (so before Lightning starts the second process),
    once; errors that one rank alone meets are tests/end_to_end/test_launchers.py's."""
    result = train(tmp_path / "run", data_dir, small, "method=padim", *TWO_PROCESSES,
                   "evaluation.aupro_fpr_limit=1.5")  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.count("Error: evaluation.aupro_fpr_limit must be a number in (0, 1], got 1.5") == 1
