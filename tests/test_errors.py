"""A user's mistake ends every command the same way: one short block naming what, where and the fix, a
non-zero exit, no traceback (unless HYDRA_FULL_ERROR=1), and no work done before it."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

FAST = ["logger=none", "trainer.enable_progress_bar=false", "dataset.num_workers=0"]


def command(module: str, *arguments: str, cwd: Path, full_error: bool = False) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    return subprocess.run([sys.executable, "-m", f"anomaly.cli.{module}", *arguments], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def assert_one_block(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in result.stderr, (text, result.stderr)


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    """An MVTec-layout category whose test split holds one corrupt image."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, count in (("train/good", 4), ("test/good", 2), ("test/dent", 2)):
        for i in range(count):
            path = root / "widget" / split / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    for i in range(2):
        mask = np.zeros((32, 32), np.uint8)
        mask[8:16, 8:16] = 1  # a 0/1 export
        (root / "widget" / "ground_truth" / "dent").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(root / "widget" / "ground_truth" / "dent" / f"{i:03d}_mask.png")
    (root / "widget" / "test" / "dent" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n cut off")
    return root


def test_a_bad_config_value_is_one_block_and_the_traceback_is_opt_in(tmp_path):
    result = command("train", *FAST, "dataset.batch_size=0", cwd=tmp_path)
    assert_one_block(result, "Error: dataset.batch_size must be a positive int, got 0")
    full = command("train", *FAST, "dataset.batch_size=0", cwd=tmp_path, full_error=True)
    assert full.returncode != 0 and "run_job" in full.stderr  # the frames of the traceback


def test_bad_data_stops_before_any_work_naming_the_file(parts, tmp_path):
    arguments = [*FAST, "dataset=mvtec", f"dataset.root={parts}", "dataset.category=widget",
                 "dataset.image_size=32", "dataset.crop_size=null", "method=padim"]  # fmt: skip
    result = command("train", *arguments, cwd=tmp_path)
    assert_one_block(result, "unreadable image (1)", "test/dent/001.png", "dataset.on_bad_file=skip")
    assert not list(tmp_path.rglob("model.safetensors"))  # nothing was fitted
    checked = command("check_data", *arguments, cwd=tmp_path)
    assert_one_block(checked, "unreadable image (1)", "test/dent/001.png")

    (parts / "widget" / "test" / "dent" / "001.png").unlink()
    (parts / "widget" / "ground_truth" / "dent" / "001_mask.png").unlink()
    checked = command("check_data", *arguments, cwd=tmp_path)
    assert checked.returncode == 0 and "Every file is usable" in checked.stdout


def test_a_damaged_model_file_fails_predict_naming_it(tmp_path):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"truncated")
    result = command("predict", f"model={model}", f"input={tmp_path}", cwd=tmp_path)
    assert_one_block(result, str(model), "anomaly-train")
