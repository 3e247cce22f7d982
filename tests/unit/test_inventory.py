"""One inventory for every command that reads a folder: train, check-data, predict and update use and skip
files by the same rules and name every file they skip; a file of several pages is refused, never cut to
its first page; the EXIF orientation is applied once, so the size the data check compares is the size the
run uses."""

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from anomaly.cli.update import update
from anomaly.data.check import check_samples
from anomaly.data.decode import MultiPageImageError, read_image
from anomaly.data.folder import Folder
from anomaly.data.samples import Sample, list_images, list_images_recursive
from anomaly.errors import DataError
from anomaly.prediction import PredictionResult, predict_folder

ORIENTATION = 0x0112  # the EXIF tag
pytestmark = pytest.mark.filterwarnings("ignore:backbone resnet18 is randomly initialised")


def texture(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """A smooth random RGB image of (width, height) ``size``."""
    coarse = np.random.default_rng(seed).integers(90, 160, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.BILINEAR)


def messy_folder(folder: Path, images: int = 3) -> set[str]:
    """``images`` good PNGs beside everything a real folder holds; returns the names that are not used."""
    folder.mkdir(parents=True)
    for i in range(images):
        texture(i).save(folder / f"{i:02d}.png")
    texture(9).save(folder / "clip.gif")
    (folder / "Thumbs.db").write_bytes(b"\0" * 16)
    (folder / ".DS_Store").write_bytes(b"\0" * 16)
    (folder / "x.png").mkdir()  # a folder with an image's name
    texture(8).save(folder / "x.png" / "inner.png")
    return {"clip.gif", "Thumbs.db", ".DS_Store", "x.png"}


def predict(model: Path, inputs: Path, output_dir: Path) -> PredictionResult:
    """``predict_folder`` on the CPU, without overlays."""
    return predict_folder(
        model, str(inputs), output_dir, threshold=None, pixel_threshold=None, batch_size=4, num_workers=0,
        device=torch.device("cpu"), save_overlays=False, drift_alpha=0.01,
    )  # fmt: skip


def multi_page_tiff(path: Path, pages: int = 3) -> Path:
    first, *rest = [texture(i) for i in range(pages)]
    first.save(path, save_all=True, append_images=rest)
    return path


def test_predict_names_every_file_it_does_not_score(padim_file, tmp_path, caplog):
    not_used = messy_folder(tmp_path / "line")
    with caplog.at_level(logging.WARNING):
        rows = list(csv.DictReader(predict(padim_file, tmp_path / "line", tmp_path / "out").csv_path.open()))
    skipped = {Path(row["path"]).name: row["error"] for row in rows if row["image_score"] == ""}
    assert set(skipped) == not_used
    assert "not an image extension (.gif" in skipped["clip.gif"] and "hidden" in skipped[".DS_Store"]
    assert "sub-folder" in skipped["x.png"]  # says how to score what is inside
    assert len([row for row in rows if row["image_score"]]) == 3
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["not_used"] == 4
    assert "4 file(s) not used" in caplog.text


def test_update_names_every_file_it_does_not_add(padim_file, tmp_path, capsys):
    not_used = messy_folder(tmp_path / "approved") - {"x.png"}  # update searches sub-folders: x.png/inner.png
    output = tmp_path / "updated.safetensors"
    cfg = OmegaConf.create({"model": str(padim_file), "input": str(tmp_path / "approved"),
                            "output": str(output),
                            "batch_size": 4, "num_workers": 0, "device": "cpu", "cache": False,
                            "spill_dir": None})  # fmt: skip
    update(cfg)
    printed = capsys.readouterr().out
    assert "Added 4 good images" in printed and "3 file(s) not used" in printed
    assert all(name in printed for name in not_used)


def test_training_lists_the_same_files_by_the_same_rules(tmp_path):
    not_used = messy_folder(tmp_path / "good", images=5)
    data = Folder(str(tmp_path), num_workers=0, image_size=64, crop_size=None)
    data.setup()
    assert {file.path.name for file in data.skipped} == not_used
    predicted: list = []
    list_images(tmp_path / "good", predicted)
    assert {file.path.name for file in predicted} == not_used
    recursive: list = []
    assert (tmp_path / "good" / "x.png" / "inner.png") in list_images_recursive(
        tmp_path / "good", skipped=recursive
    )
    assert {file.path.name for file in recursive} == not_used - {"x.png"}


def test_a_folder_of_only_unsupported_files_says_what_it_holds(tmp_path):
    (tmp_path / "good").mkdir()
    texture(0).save(tmp_path / "good" / "a.gif")
    (tmp_path / "good" / "b.heic").write_bytes(b"\0")
    with pytest.raises(DataError, match=r"No images in .*good\. It holds 2 file\(s\) not used: .*a\.gif"):
        Folder(str(tmp_path), num_workers=0).setup()


def test_multi_page_images_are_refused_everywhere_never_cut_to_page_one(padim_file, tmp_path):
    (tmp_path / "good").mkdir()
    tiff = multi_page_tiff(tmp_path / "good" / "scan.tiff")
    for i in range(4):
        texture(i).save(tmp_path / "good" / f"{i}.png")
    with pytest.raises(MultiPageImageError, match="3 pages"):
        read_image(tiff)
    problems = check_samples([Sample(tiff, 0, None, "good")])
    assert [problem.kind for problem in problems] == ["multi_page"]
    with pytest.raises(DataError, match=r"(?s)image of several pages .*scan\.tiff"):
        Folder(str(tmp_path), num_workers=0, image_size=64, crop_size=None).setup()

    with pytest.raises(DataError, match="could be read"):
        predict(padim_file, tiff, tmp_path / "out")
    row = next(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    assert "3 pages" in row["error"] and row["image_score"] == ""


def test_an_animated_png_is_refused_on_both_decoders(tmp_path):
    frames = [texture(i) for i in range(2)]
    frames[0].save(tmp_path / "blink.png", save_all=True, append_images=frames[1:])
    texture(0).save(tmp_path / "still.png")
    with pytest.raises(MultiPageImageError, match="2 pages or frames"):
        read_image(tmp_path / "blink.png")
    assert read_image(tmp_path / "still.png").shape == (3, 64, 64)


def test_exif_rotation_is_applied_to_the_checked_size_and_the_run_alike(tmp_path):
    """A non-square defective photo stored landscape with "rotate 90°" in its EXIF is a portrait image: its
    mask is portrait too. The check and the run agree on that; a landscape mask is refused by both."""
    root = tmp_path / "data"
    for i in range(4):
        (root / "good").mkdir(parents=True, exist_ok=True)
        texture(i, (48, 64)).save(root / "good" / f"{i}.png")
    (root / "defect").mkdir()
    (root / "mask").mkdir()
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # stored 64 wide x 48 high; shown (and read) 48 wide x 64 high
    texture(7, (64, 48)).save(root / "defect" / "dent.jpg", exif=exif.tobytes())
    assert read_image(root / "defect" / "dent.jpg").shape == (3, 64, 48)
    mask = np.zeros((64, 48), np.uint8)  # portrait, as the image is read
    mask[10:20, 10:20] = 255
    Image.fromarray(mask).save(root / "mask" / "dent_mask.png")

    data = Folder(str(root), num_workers=0, image_size=[64, 48], crop_size=None, normal_test_fraction=0.25)
    data.setup()
    defective = next(batch for batch in data.test_dataloader() if batch["label"].any())
    assert defective["mask"].sum() > 0  # read, aligned and not refused

    Image.fromarray(mask.T.copy()).save(root / "mask" / "dent_mask.png")  # landscape: the unrotated size
    problems = check_samples(
        [Sample(root / "defect" / "dent.jpg", 1, root / "mask" / "dent_mask.png", "dent")]
    )
    assert [problem.kind for problem in problems] == ["mask_size"]
    assert "is 64x48 but its image" in problems[0].detail and "is 48x64" in problems[0].detail


def test_a_folder_that_cannot_be_listed_is_named_with_the_fix(tmp_path, monkeypatch):
    """(Simulated: the tests run as root, whom permission bits do not stop.)"""
    locked = tmp_path / "locked"
    locked.mkdir()
    original = Path.iterdir

    def iterdir(self):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return original(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(DataError, match=r"Cannot list folder .*locked: permission denied.*chmod u\+rx"):
        list_images_recursive(locked)
