"""The commands' file-system faults end as one block (exit 1, ``Error:`` once, the path named, no traceback),
and a printed fix works when done exactly as printed; a moved run folder is recognised as its results."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from anomaly.backbones import FeatureExtractor
from anomaly.data.preprocessing import Preprocessing
from anomaly.data.synthetic import ensure_dataset
from anomaly.methods.padim.model import Padim
from anomaly.model_io import save_model

pytestmark = pytest.mark.slow  # commands: seconds each

TINY = [
    "method=padim", "logger=none", "threshold.source=none", "dataset.num_workers=0",
    "trainer.enable_progress_bar=false", "dataset.n_train=4", "dataset.n_calibration=0",
    "dataset.n_test_good=2", "dataset.n_test_defect=3", "dataset.generated_size=64", "dataset.image_size=64",
    "paths.results_db=null",
]  # fmt: skip


def command(module: str, *arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    return subprocess.run([sys.executable, "-m", f"anomaly.cli.{module}", *arguments], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def assert_one_block(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("Error:") == 1, result.stderr
    for text in expected:
        assert text in result.stderr, (text, result.stderr)


@pytest.fixture
def read_only_folder(tmp_path) -> Path:
    """A folder this user cannot create anything in; root ignores the mode, so as root it is made
    immutable (chattr +i), or the test is skipped where that is not possible."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if os.access(folder, os.W_OK):
        immutable = (
            shutil.which("chattr") is not None
            and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        )
        if not immutable:
            pytest.skip("this user can write into a read-only folder (root) and chattr +i is not available")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


@pytest.mark.parametrize("sweep", [False, True])
def test_a_run_folder_that_cannot_be_created_is_one_block(
    read_only_folder, tmp_path, sweep, command_in_process
):
    """main() in this process: the folder is refused before the job starts, and a process would add only
    its imports (the command as a process: the other tests here)."""
    target = read_only_folder / ("sweep" if sweep else "run")
    setting = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    arguments = ["-m", *TINY, "seed=1,2"] if sweep else TINY
    result = command_in_process("train", *arguments, f"{setting}={target}", cwd=tmp_path)
    assert_one_block(result, f"Cannot create the output folder {target}", f"{setting}=<folder>")


@pytest.fixture(scope="module")
def weights_file_model(tmp_path_factory) -> tuple[Path, Path]:
    """A PaDiM file whose pretrained backbone (ResNet18 layer1+2) loads its weights from a file, as
    ``backbone.weights_path=<file>`` trains it; returns (model file, weights file)."""
    work = tmp_path_factory.mktemp("weights")
    weights = work / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    backbone = {"name": "resnet18", "layers": ["layer1", "layer2"], "weights": None,
                "weights_path": str(weights)}  # fmt: skip
    model = Padim(FeatureExtractor(**backbone), n_features=20, seed=3)
    model.collect(torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    model.fit()
    path = work / "model.safetensors"
    config = {"n_features": 20, "seed": 3, "backbone": backbone}
    save_model(model, "padim", config, Preprocessing([64, 64], None), path)
    return path, weights


def test_the_printed_fix_for_missing_weights_works_for_predict_and_update(weights_file_model, tmp_path):
    """The weights file moved (another machine): the block says backbone.weights_path=<file>, and that
    setting, given exactly so, scores the images (predict) and updates the model (update)."""
    model, weights = weights_file_model
    moved = tmp_path / "elsewhere" / "resnet18.pth"
    moved.parent.mkdir()
    shutil.copy(weights, moved)
    weights.rename(weights.with_suffix(".gone"))
    try:
        images = tmp_path / "images"
        images.mkdir()
        for i in range(2):
            pixels = np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(images / f"{i}.png")
        refused = command("predict", f"model={model}", f"input={images}", cwd=tmp_path)
        assert_one_block(refused, str(weights), "backbone.weights_path=")
        fixed = command("predict", f"model={model}", f"input={images}", f"backbone.weights_path={moved}",
                        "save_overlays=false", "num_workers=0", f"hydra.run.dir={tmp_path / 'predicted'}",
                        cwd=tmp_path)  # fmt: skip
        assert fixed.returncode == 0, fixed.stderr
        assert (tmp_path / "predicted" / "predictions.csv").is_file()
        output = tmp_path / "updated.safetensors"
        updated = command("update", f"model={model}", f"input={images}", f"output={output}", "num_workers=0",
                          f"backbone.weights_path={moved}", cwd=tmp_path)  # fmt: skip
        assert updated.returncode == 0 and output.is_file(), updated.stderr
    finally:
        weights.with_suffix(".gone").rename(weights)


def test_a_moved_run_folder_resumes_and_a_ddp_rerun_is_the_same_results(tmp_path):
    root = ensure_dataset(tmp_path / "data" / "synthetic", ["fabric"], n_train=4, n_test_good=2,
                          n_test_defect=3, image_size=64, seed=0)  # fmt: skip
    first = tmp_path / "disk1" / "run"
    trained = command("train", *TINY, f"dataset.root={root}", f"hydra.run.dir={first}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    moved = tmp_path / "disk2" / "run"
    shutil.copytree(first, moved)  # the folder copied to another disk
    before = (moved / "metrics.json").read_bytes()
    for extra in ([], ["trainer=ddp", "trainer.devices=2"]):
        again = command("train", *TINY, f"dataset.root={root}", f"hydra.run.dir={moved}", *extra,
                        cwd=tmp_path)  # fmt: skip
        assert again.returncode == 0, again.stderr
        assert "results of an earlier run of this config" in again.stdout, (extra, again.stdout)
    assert (moved / "metrics.json").read_bytes() == before  # nothing was redone
