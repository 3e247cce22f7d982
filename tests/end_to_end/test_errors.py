"""A user's mistake ends every command the same way: one short block naming what, where and the fix, a
non-zero exit, no traceback (unless HYDRA_FULL_ERROR=1), and no work done before it."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.slow  # commands and whole runs: seconds to a minute each

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


def test_a_bad_config_value_is_one_block_and_the_traceback_is_opt_in(tmp_path, command_in_process):
    result = command("train", *FAST, "dataset.batch_size=0", cwd=tmp_path)
    assert_one_block(result, "Error: dataset.batch_size must be a positive int, got 0")
    full = command_in_process("train", *FAST, "dataset.batch_size=0", cwd=tmp_path, full_error=True)
    assert full.returncode != 0 and "run_job" in full.stderr  # the frames of the traceback


def test_bad_data_stops_before_any_work_naming_the_file(parts, tmp_path, command_in_process):
    arguments = [*FAST, "dataset=mvtec", f"dataset.root={parts}", "dataset.category=widget",
                 "dataset.image_size=32", "dataset.crop_size=null", "method=padim"]  # fmt: skip
    result = command("train", *arguments, cwd=tmp_path)
    assert_one_block(result, "unreadable image (1)", "test/dent/001.png", "dataset.on_bad_file=skip")
    assert not list(tmp_path.rglob("model.safetensors"))  # nothing was fitted
    checked = command("check_data", *arguments, cwd=tmp_path)
    assert_one_block(checked, "unreadable image (1)", "test/dent/001.png")

    (parts / "widget" / "test" / "dent" / "001.png").unlink()
    (parts / "widget" / "ground_truth" / "dent" / "001_mask.png").unlink()
    checked = command_in_process("check_data", *arguments, cwd=tmp_path)
    assert checked.returncode == 0 and "Every file is usable" in checked.stdout


def test_a_damaged_model_file_fails_predict_naming_it(tmp_path):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"truncated")
    result = command("predict", f"model={model}", f"input={tmp_path}", cwd=tmp_path)
    assert_one_block(result, str(model), "anomaly-train")


def texture(rng: np.random.Generator, size: int = 32) -> Image.Image:
    """A smooth random image: the good parts of the corpus."""
    coarse = rng.integers(80, 170, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.BILINEAR)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """A user folder (``<root>/good``, ``defect``, ``mask``) holding, beside its good images, every kind of
    file a real folder holds: damaged images, a multi-page scan, images under the wrong extension, formats
    that are not read, system files, a sub-folder with an image's name. Returns the names by what should
    happen to them."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    good, defect, masks = root / "good", root / "defect", root / "mask"
    for folder in (good, defect, masks):
        folder.mkdir()
    for i in range(12):
        texture(rng).save(good / f"{i:03d}.png")
    for i in range(3):
        image = np.asarray(texture(rng)).copy()
        image[8:16, 8:16] = 255
        Image.fromarray(image).save(defect / f"d{i}.png")
        mask = np.zeros((32, 32), np.uint8)
        mask[8:16, 8:16] = 255
        Image.fromarray(mask).save(masks / f"d{i}_mask.png")
    (good / "100_truncated.png").write_bytes((good / "000.png").read_bytes()[:60])
    (good / "101_empty.jpg").write_bytes(b"")
    (good / "102_text.png").write_text("not an image")
    texture(rng).save(good / "103_scan.tiff", save_all=True, append_images=[texture(rng), texture(rng)])
    texture(rng).save(good / "clip.gif")
    (good / "Thumbs.db").write_bytes(b"\0" * 32)
    (good / ".DS_Store").write_bytes(b"\0" * 32)
    (good / "x.png").mkdir()
    return {
        "bad": {"100_truncated.png", "101_empty.jpg", "102_text.png", "103_scan.tiff"},
        "not_used": {"clip.gif", "Thumbs.db", ".DS_Store", "x.png"},
        "root": root,
    }


def corpus_train(corpus, *extra: str) -> list[str]:
    return [*FAST, "dataset=folder", f"dataset.root={corpus['root']}", "dataset.image_size=[32,32]",
            "method=padim", "method.model.n_features=20", "dataset.batch_size=8", "paths.results_db=null",
            *extra]  # fmt: skip


@pytest.fixture(scope="module")
def skipping_run(corpus, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """anomaly-train on the corpus with ``dataset.on_bad_file=skip``: (its result, its run dir); the corpus
    test checks it, and the damaged model files are its model's."""
    work = tmp_path_factory.mktemp("skipping")
    run_dir = work / "run"
    arguments = corpus_train(corpus, "dataset.on_bad_file=skip", f"hydra.run.dir={run_dir}")
    return command("train", *arguments, cwd=work), run_dir


def test_a_corpus_of_bad_files_is_named_file_by_file_by_every_command(
    corpus, skipping_run, tmp_path, command_in_process
):
    """No traceback, no file lost, no exit 0 on a bad file unless asked to skip it; every skip named."""
    root = corpus["root"]
    refused = command("train", *corpus_train(corpus), cwd=tmp_path)
    assert_one_block(refused, "dataset.on_bad_file=skip", "run.json", *corpus["bad"])
    assert not list(tmp_path.rglob("model.safetensors"))
    checked = command_in_process("check_data", *corpus_train(corpus), cwd=tmp_path)
    assert_one_block(checked, *corpus["bad"])

    trained, run_dir = skipping_run
    assert trained.returncode == 0, trained.stderr
    assert all(name in trained.stdout + trained.stderr for name in corpus["not_used"])  # in the log
    record = json.loads((run_dir / "run.json").read_text())
    assert {Path(line.split(":")[0]).name for line in record["skipped_files"]} == corpus["bad"]
    assert all(math.isfinite(value) for value in record["metrics"].values())

    out = tmp_path / "predictions"
    predicted = command_in_process("predict", f"model={run_dir}", f"input={root / 'good'}",
                                   f"hydra.run.dir={out}", "num_workers=0", cwd=tmp_path)  # fmt: skip
    assert predicted.returncode == 0 and "Traceback" not in predicted.stderr, predicted.stderr
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    every_entry = {path.name for path in (root / "good").iterdir()}
    assert {Path(row["path"]).name for row in rows} == every_entry  # nothing lost
    for row in rows:
        assert math.isfinite(float(row["image_score"])) if row["image_score"] else row["error"], row

    updated = command_in_process(
        "update", f"model={run_dir}", f"input={root / 'good'}", "num_workers=0", cwd=tmp_path
    )
    assert_one_block(updated, *corpus["bad"])
    assert not list(run_dir.glob("*.updated-*"))


@pytest.fixture(scope="module")
def damaged_models(skipping_run, tmp_path_factory) -> dict[str, Path]:
    """Model files of one trained run, each damaged in one value or tensor."""
    work = tmp_path_factory.mktemp("damaged")
    trained, run_dir = skipping_run
    assert trained.returncode == 0, trained.stderr
    source = run_dir / "model.safetensors"
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
    state = load_file(str(source))
    calibration = json.loads(metadata["calibration"]) | {"threshold": math.nan}
    damaged = {
        "nan_threshold": ({**metadata, "calibration": json.dumps(calibration)}, state),
        "nan_tensor": (metadata, {**state, "mean": torch.full_like(state["mean"], math.nan)}),
        "wrong_shape": (metadata, {**state, "mean": state["mean"][:-1]}),
    }
    paths = {}
    for name, (values, tensors) in damaged.items():
        paths[name] = work / f"{name}.safetensors"
        save_file(tensors, str(paths[name]), metadata=values)
    return paths


@pytest.mark.parametrize("damage", ["nan_threshold", "nan_tensor", "wrong_shape"])
def test_a_damaged_model_file_is_one_block_for_predict_and_update(
    damaged_models, corpus, damage, tmp_path, command_in_process
):
    good = corpus["root"] / "good"
    model = damaged_models[damage]
    predicted = command_in_process("predict", f"model={model}", f"input={good / '000.png'}", cwd=tmp_path)
    assert_one_block(predicted, str(model), "anomaly-train")
    assert not list(tmp_path.rglob("predictions.csv"))  # no verdict was written
    if damage == "nan_threshold":
        updated = command_in_process("update", f"model={model}", f"input={good}", cwd=tmp_path)
        assert_one_block(updated, str(model))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("seed=-1", "seed must be an int in [0, 4294967295]"),
        ("threshold.false_alarm_rate=1.5", "threshold.false_alarm_rate must be a number in (0, 1)"),
        ("method.model.blur_sigma=nan", "blur_sigma must be finite"),
        ("backbone.weights_path=/nowhere/weights.pth", "/nowhere/weights.pth does not exist"),
        ("evaluation.exact_pixel_limit=-1", "evaluation.exact_pixel_limit must be an int >= 0"),
        ("paths.spill_dir=/nowhere/scratch", "paths.spill_dir=/nowhere/scratch does not exist"),
        ("dataset.root=ROOT_FILE", "is a file, but a folder is expected"),
    ],
)
def test_a_bad_value_is_one_block_before_any_work(corpus, tmp_path, override, expected, command_in_process):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    override = override.replace("ROOT_FILE", str(tmp_path / "notes.txt"))
    arguments = [item for item in corpus_train(corpus) if not item.startswith(override.split("=")[0] + "=")]
    result = command_in_process("train", *arguments, override, cwd=tmp_path)
    assert_one_block(result, expected)
    assert not list(tmp_path.rglob("model.safetensors"))
