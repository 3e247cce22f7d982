"""The benchmarks beyond MVTec AD, each on a generated tree of its exact published layout: parsed, refused
with the path when the layout is wrong, and run end to end."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from anomaly.data.btad import BTAD
from anomaly.data.mvtec_ad2 import MVTecAD2
from anomaly.data.mvtec_loco import MVTecLOCO
from anomaly.data.visa import VisA
from anomaly.errors import ConfigError, DataError
from anomaly.model_io import read_calibration

pytestmark = pytest.mark.slow  # commands and whole runs: seconds to a minute each

SIZE = (48, 40)  # width, height: not square, so that a transposed map would show
BOX = (16, 12, 28, 22)  # x0, y0, x1, y1 of the defect
LOADER = {"image_size": 64, "crop_size": None, "num_workers": 0, "batch_size": 8}


def part(seed: int, defect: bool = False) -> np.ndarray:
    """A textured grey part ``[H, W, 3]`` uint8; a defect is a bright square at :data:`BOX`."""
    x, y = np.linspace(0, 6 * np.pi, SIZE[0]), np.linspace(0, 4 * np.pi, SIZE[1])
    image = 128 + 50 * np.sin(x)[None] * np.cos(y)[:, None]
    image = image + np.random.default_rng(seed).normal(0, 4, image.shape)
    if defect:
        image[BOX[1] : BOX[3], BOX[0] : BOX[2]] = 255
    return np.repeat(image.clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)


def save(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def mask(value: int = 255, box: tuple[int, int, int, int] = BOX) -> np.ndarray:
    pixels = np.zeros(SIZE[::-1], np.uint8)
    pixels[box[1] : box[3], box[0] : box[2]] = value
    return pixels


def write_parts(folder: Path, names: list[str], defect: bool, seed: int) -> list[str]:
    for i, name in enumerate(names):
        save(folder / name, part(seed + i, defect))
    return names


@pytest.fixture
def visa_root(tmp_path: Path) -> Path:
    """VisA as released: ``split_csv/1cls.csv``, JPEG images, masks whose defect pixels are 1 (not 255)."""
    root, rows = tmp_path / "VisA", []
    images = root / "candle" / "Data" / "Images"
    for i in range(10):
        save(images / "Normal" / f"{i:04d}.JPG", part(i))
        rows.append(
            ["candle", "train" if i < 7 else "test", "normal", f"candle/Data/Images/Normal/{i:04d}.JPG", ""]
        )
    for i in range(4):
        save(images / "Anomaly" / f"{i:03d}.JPG", part(100 + i, defect=True))
        save(root / "candle" / "Data" / "Masks" / "Anomaly" / f"{i:03d}.png", mask(value=1))
        rows.append(["candle", "test", "anomaly", f"candle/Data/Images/Anomaly/{i:03d}.JPG",
                     f"candle/Data/Masks/Anomaly/{i:03d}.png"])  # fmt: skip
    (root / "candle" / "image_anno.csv").write_text("image,label,mask\n")  # in the release, not used
    (root / "split_csv").mkdir()
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as file:
        csv.writer(file).writerows([["object", "split", "label", "image", "mask"], *rows])
    return root


@pytest.fixture
def btad_root(tmp_path: Path) -> Path:
    """BTAD: ``ok``/``ko`` folders, BMP images, masks named like their image (PNG)."""
    product = tmp_path / "BTech_Dataset_transformed" / "01"
    write_parts(product / "train" / "ok", [f"{i:04d}.bmp" for i in range(8)], False, 0)
    write_parts(product / "test" / "ok", [f"{i:04d}.bmp" for i in range(3)], False, 50)
    for name in write_parts(product / "test" / "ko", [f"{i:04d}.bmp" for i in range(4)], True, 100):
        save(product / "ground_truth" / "ko" / name.replace(".bmp", ".png"), mask())
    return product.parent


@pytest.fixture
def loco_root(tmp_path: Path) -> Path:
    """MVTec LOCO AD: ``validation/good``, two defect types, a folder of masks per defective image."""
    category = tmp_path / "mvtec_loco_anomaly_detection" / "juice_bottle"
    write_parts(category / "train" / "good", [f"{i:03d}.png" for i in range(8)], False, 0)
    write_parts(category / "validation" / "good", [f"{i:03d}.png" for i in range(3)], False, 30)
    write_parts(category / "test" / "good", [f"{i:03d}.png" for i in range(3)], False, 50)
    for defect in ("logical_anomalies", "structural_anomalies"):
        for name in write_parts(category / "test" / defect, ["000.png", "001.png"], True, 100):
            masks = category / "ground_truth" / defect / Path(name).stem
            save(masks / "000.png", mask(box=(BOX[0], BOX[1], 22, BOX[3])))  # two defects, one mask each
            save(masks / "001.png", mask(box=(22, BOX[1], BOX[2], BOX[3])))
    return category.parent


@pytest.fixture
def ad2_root(tmp_path: Path) -> Path:
    """MVTec AD 2: ``validation/good``, ``test_public`` with its ground truth, two private sets."""
    category = tmp_path / "mvtec_ad_2" / "vial"
    write_parts(category / "train" / "good", [f"{i:03d}_regular.png" for i in range(8)], False, 0)
    write_parts(category / "validation" / "good", [f"{i:03d}_regular.png" for i in range(4)], False, 30)
    write_parts(category / "test_public" / "good", [f"{i:03d}_regular.png" for i in range(3)], False, 50)
    for name in write_parts(
        category / "test_public" / "bad", [f"{i:03d}_regular.png" for i in range(3)], True, 100
    ):
        save(category / "test_public" / "ground_truth" / "bad" / name.replace(".png", "_mask.png"), mask())
    write_parts(category / "test_private", ["000.png", "001.png"], True, 200)
    write_parts(category / "test_private_mixed", ["000.png"], False, 300)
    return category.parent


def test_visa_is_read_as_released(visa_root):
    data = VisA(str(visa_root), "candle", **LOADER)
    data.setup()
    assert len(data.train_samples) == 7 and {s.label for s in data.train_samples} == {0}
    assert sorted(s.label for s in data.test_samples) == [0, 0, 0, 1, 1, 1, 1]
    assert data.has_pixel_ground_truth()
    assert any(f.path.name == "image_anno.csv" for f in data.skipped)  # seen, not used, and said so
    batch = next(iter(data.test_dataloader()))
    defective = batch["label"] == 1
    assert batch["mask"][defective].sum() > 0 and batch["mask"][~defective].sum() == 0  # class id 1 counts


def test_visa_lists_several_categories_for_one_model_from_its_split_file(visa_root):
    """The unified protocol: each category's rows of 1cls.csv, tagged with it; a category the file does not
    list is named with those it does."""
    shutil.copytree(visa_root / "candle", visa_root / "pcb1")
    split = visa_root / "split_csv" / "1cls.csv"
    rows = list(csv.reader(split.open()))
    pcb1 = [
        ["pcb1", row[1], row[2], *(p.replace("candle/", "pcb1/", 1) for p in row[3:])] for row in rows[1:]
    ]
    with split.open("w", newline="") as file:
        csv.writer(file).writerows([*rows, *pcb1])
    data = VisA(str(visa_root), ["candle", "pcb1"], **{**LOADER, "image_size": [64, 64]})
    data.setup()
    assert [s.category for s in data.train_samples] == ["candle"] * 7 + ["pcb1"] * 7
    assert [s.category for s in data.test_samples] == ["candle"] * 7 + ["pcb1"] * 7
    assert all(s.image_path.parts[-5] == s.category for s in data.train_samples + data.test_samples)
    with pytest.raises(DataError, match=r"names 'fryum', which .* does not hold; it holds: candle, pcb1"):
        VisA(str(visa_root), ["candle", "fryum"], **{**LOADER, "image_size": [64, 64]}).setup()


def test_mvtec_ad2_refuses_one_model_for_several_objects(ad2_root):
    with pytest.raises(ConfigError, match=r"submitted per object.*got vial\+can"):
        MVTecAD2(str(ad2_root), ["vial", "can"], **{**LOADER, "image_size": [64, 64]})


def test_visa_layout_errors_name_the_path(visa_root, tmp_path):
    with pytest.raises(DataError, match=r"split_csv/1cls.csv not found.*VisA_20220922"):
        VisA(str(tmp_path / "elsewhere"), "candle", **LOADER).setup()
    with pytest.raises(DataError, match=r"Category 'pcb1' is not in .*1cls.csv \(it lists: candle\)"):
        VisA(str(visa_root), "pcb1", **LOADER).setup()
    (visa_root / "candle" / "Data" / "Images" / "Anomaly" / "002.JPG").unlink()
    with pytest.raises(DataError, match=r"Anomaly/002.JPG"):
        VisA(str(visa_root), "candle", **LOADER).setup()
    (visa_root / "split_csv" / "1cls.csv").write_text("object,image\ncandle,x.JPG\n")
    with pytest.raises(
        DataError, match=r"must have the columns object,split,label,image,mask; found object,image"
    ):
        VisA(str(visa_root), "candle", **LOADER).setup()


def test_btad_reads_ok_ko_bmp_and_masks_named_like_their_image(btad_root):
    data = BTAD(str(btad_root), "01", **LOADER)
    data.setup()
    assert len(data.train_samples) == 8 and data.train_samples[0].image_path.suffix == ".bmp"
    defective = [s for s in data.test_samples if s.label == 1]
    assert [s.mask_path.name for s in defective] == ["0000.png", "0001.png", "0002.png", "0003.png"]
    assert {s.defect_type for s in data.test_samples} == {"ko", "good"}


def test_btad_layout_error_names_the_expected_folder(btad_root):
    (btad_root / "01" / "train" / "ok").rename(btad_root / "01" / "train" / "good")  # MVTec AD's name
    with pytest.raises(DataError, match=r"Training images not found: expected folder .*01/train/ok"):
        BTAD(str(btad_root), "01", **LOADER).setup()


def test_loco_holds_out_its_validation_set_and_unites_an_images_masks(loco_root):
    data = MVTecLOCO(str(loco_root), "juice_bottle", **LOADER)
    data.setup()
    assert len(data.train_samples) == 8 and len(data.calibration_samples) == 3  # validation/good: calibration
    assert {s.defect_type for s in data.test_samples} == {"good", "logical_anomalies", "structural_anomalies"}
    batch = next(iter(data.test_dataloader()))
    first = batch["mask"][batch["label"] == 1][0, 0]
    expected = np.array(Image.fromarray(mask()).resize((76, 64), Image.NEAREST)) > 0  # both halves
    assert (first.numpy() > 0).sum() == pytest.approx(expected.sum(), rel=0.15)


def test_loco_mask_file_instead_of_folder_names_the_expected_folder(loco_root):
    masks = loco_root / "juice_bottle" / "ground_truth" / "logical_anomalies" / "001"
    for file in masks.iterdir():
        file.unlink()
    masks.rmdir()
    save(masks.with_name("001_mask.png"), mask())  # MVTec AD's naming, not LOCO's
    with pytest.raises(DataError, match=r"(?s)logical_anomalies/001\b"):
        MVTecLOCO(str(loco_root), "juice_bottle", **LOADER).setup()


def test_ad2_reads_test_public_validation_and_private_sets(ad2_root):
    data = MVTecAD2(str(ad2_root), "vial", **LOADER)
    data.setup()
    assert len(data.train_samples) == 8 and len(data.calibration_samples) == 4
    assert sorted(s.label for s in data.test_samples) == [0, 0, 0, 1, 1, 1]
    assert {name: len(samples) for name, samples in data.unlabeled.items()} == {
        "test_private": 2, "test_private_mixed": 1,
    }  # fmt: skip


def test_ad2_layout_errors(ad2_root):
    (ad2_root / "vial" / "test_public").rename(ad2_root / "vial" / "test")
    with pytest.raises(
        DataError, match=r"Test split of 'vial' not found: expected folder .*vial/test_public"
    ):
        MVTecAD2(str(ad2_root), "vial", **LOADER).setup()
    with pytest.raises(ConfigError, match=r"crop_size=null"):
        MVTecAD2(str(ad2_root), "vial", **{**LOADER, "crop_size": 32})


@pytest.mark.parametrize(
    ("dataset", "root_fixture", "category"),
    [
        ("visa", "visa_root", "candle"),
        ("btad", "btad_root", "'01'"),
        ("mvtec_loco", "loco_root", "juice_bottle"),
        ("mvtec_ad2", "ad2_root", "vial"),
    ],
)
def test_each_benchmark_runs_end_to_end(request, tmp_path, run_job, dataset, root_fixture, category):
    root = request.getfixturevalue(root_fixture)
    overrides = [f"dataset={dataset}", f"dataset.root={root}", f"dataset.category={category}",
                 *(f"dataset.{key}={'null' if value is None else value}" for key, value in LOADER.items()),
                 "method=padim", "logger=none", "trainer.enable_progress_bar=false"]  # fmt: skip
    metrics, run_dir = run_job(tmp_path, overrides)
    assert metrics["image_auroc"] > 0.9 and metrics["pixel_auroc"] > 0.9, metrics
    # the calibration images' true origin, in run.json and in the model file
    own = dataset in ("mvtec_loco", "mvtec_ad2")  # their validation/good; the others (MVTec AD's protocol):
    expected = "the data set's own held-out normal images" if own else "cross-fit over the"  # a cross-fit
    assert expected in json.loads((run_dir / "run.json").read_text())["calibration"]["source"]
    assert expected in read_calibration(run_dir).source
    if dataset == "mvtec_ad2":  # the private sets, as the evaluation server takes them
        submission = run_dir / "mvtec_ad2_submission"
        maps = sorted((submission / "anomaly_images" / "vial").rglob("*.tiff"))
        assert [p.relative_to(submission / "anomaly_images").as_posix() for p in maps] == [
            "vial/test_private/000.tiff", "vial/test_private/001.tiff", "vial/test_private_mixed/000.tiff",
        ]  # fmt: skip
        full = tifffile.imread(maps[0])  # a defective part, at its image's full size
        assert full.shape == SIZE[::-1] and full.dtype == np.float16
        assert full[BOX[1] : BOX[3], BOX[0] : BOX[2]].mean() > 2 * full.mean(where=mask() == 0)
        thresholded = submission / "anomaly_images_thresholded" / "vial"
        defective = np.array(Image.open(thresholded / "test_private" / "000.png"))
        good = np.array(Image.open(thresholded / "test_private_mixed" / "000.png"))
        assert set(np.unique(defective)) <= {0, 255} and defective.shape == SIZE[::-1]
        assert defective[BOX[1] : BOX[3], BOX[0] : BOX[2]].min() == 255 and good.mean() < defective.mean()
