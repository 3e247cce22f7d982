"""Data sets as sample tables: MVTec AD's layout, the folder layout, decoding, aligned transforms, seeded
splits, and errors that name the file."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly.data.dataset import ImageDataset
from anomaly.data.decode import read_image
from anomaly.data.folder import Folder
from anomaly.data.mvtec import MVTecAD
from anomaly.data.preprocessing import Preprocessing
from anomaly.data.samples import Sample, seeded_split
from anomaly.errors import DataError


def write_image(path: Path, size=(40, 30), value=128, mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, value, value)).save(path)
    return path


def write_mask(path: Path, size=(40, 30), box=(10, 5, 20, 15)) -> Path:
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[box[1] : box[3], box[0] : box[2]] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)
    return path


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    category = tmp_path / "widget"
    for i in range(4):
        write_image(category / "train" / "good" / f"{i:03d}.png")
    write_image(category / "test" / "good" / "000.png")
    write_image(category / "test" / "crack" / "000.png", mode="L")  # grayscale, like grid/screw/zipper
    write_mask(category / "ground_truth" / "crack" / "000_mask.png")
    return tmp_path


def test_mvtec_layout_is_parsed(mvtec_root):
    data = MVTecAD(str(mvtec_root), "widget", image_size=32, crop_size=None, num_workers=0)
    data.setup()
    assert len(data.train_samples) == 4 and all(s.label == 0 for s in data.train_samples)
    assert [(s.label, s.defect_type) for s in data.test_samples] == [(1, "crack"), (0, "good")]
    assert data.test_samples[0].mask_path.name == "000_mask.png"
    assert data.has_pixel_ground_truth()
    batch = next(iter(data.test_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 42) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (2, 1, 32, 42) and set(batch["mask"].unique().tolist()) == {0, 1}
    assert batch["mask"][1].sum() == 0


def test_missing_category_error_names_path_and_fix(tmp_path):
    data = MVTecAD(str(tmp_path), "carpet")
    with pytest.raises(
        DataError, match=r"Category .carpet. not found: expected folder .*carpet.*dataset.root"
    ):
        data.setup()


def test_missing_mask_is_an_error_naming_the_expected_file(mvtec_root):
    (mvtec_root / "widget" / "ground_truth" / "crack" / "000_mask.png").unlink()
    with pytest.raises(DataError, match=r"000_mask.png"):
        MVTecAD(str(mvtec_root), "widget").setup()


def test_corrupt_image_is_reported_by_file_before_any_work(mvtec_root):
    (mvtec_root / "widget" / "test" / "good" / "000.png").write_bytes(b"not a png")
    data = MVTecAD(str(mvtec_root), "widget", image_size=32, crop_size=None, num_workers=0)
    with pytest.raises(DataError, match=r"(?s)unreadable image \(1\).*test/good/000.png"):
        data.setup()  # listing and the data check, before any loader is built


def test_read_image_gives_pils_rgb_pixels_for_every_format_and_scales_16_bit(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    variants = {
        "rgb.png": Image.fromarray(rgb),
        "rgba.png": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
        "grey.png": Image.fromarray(rgb[..., 0]),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "rgb.jpg": Image.fromarray(rgb),
        "grey.jpeg": Image.fromarray(rgb[..., 0]),
        "rgb.bmp": Image.fromarray(rgb),
        "rgb.tiff": Image.fromarray(rgb),
    }
    for name, image in variants.items():
        image.save(tmp_path / name)
        with Image.open(tmp_path / name) as reference:
            expected = torch.from_numpy(np.asarray(reference.convert("RGB")).copy()).permute(2, 0, 1)
        assert torch.equal(read_image(tmp_path / name), expected), name
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(tmp_path / "grey16.png")  # 16 bits per pixel
    assert torch.equal(read_image(tmp_path / "grey16.png"), torch.from_numpy(rgb[..., 0]).expand(3, -1, -1))
    (tmp_path / "truncated.png").write_bytes((tmp_path / "rgb.png").read_bytes()[:60])
    with pytest.raises(DataError, match=r"truncated\.png.*Replace the file"):
        read_image(tmp_path / "truncated.png")


def test_mask_of_other_size_is_an_error_naming_both_files(mvtec_root):
    write_mask(mvtec_root / "widget" / "ground_truth" / "crack" / "000_mask.png", size=(41, 30))
    data = MVTecAD(str(mvtec_root), "widget", image_size=32, crop_size=None, num_workers=0)
    with pytest.raises(DataError, match=r"(?s)000_mask.png is 41x30 but its image .*crack/000.png is 40x30"):
        data.setup()


def test_image_and_mask_transforms_stay_aligned(tmp_path):
    """A bright square in the image must land exactly where the mask says after resize + crop."""
    image = np.zeros((100, 80, 3), np.uint8)
    image[40:60, 30:50] = 255
    mask = np.zeros((100, 80), np.uint8)
    mask[40:60, 30:50] = 255
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(mask).save(tmp_path / "a_mask.png")
    dataset = ImageDataset(
        [Sample(tmp_path / "a.png", 1, tmp_path / "a_mask.png", "square")], Preprocessing(64, 48).transform()
    )
    item = dataset[0]
    assert item["image"].shape == (3, 48, 48) and item["mask"].shape == (1, 48, 48)
    bright = item["image"][0] > 0.5
    assert (bright == item["mask"][0].bool()).float().mean() > 0.98
    assert item["mask"].sum() > 0


def test_seeded_split_is_seeded_disjoint_and_keeps_the_order():
    samples = [Sample(Path(f"{i}.png"), 0, None, "good") for i in range(20)]
    train, held = seeded_split(samples, 5, seed=0)
    assert len(held) == 5 and not set(train) & set(held) and len(train) + len(held) == 20
    assert seeded_split(samples, 5, seed=0) == (train, held) != seeded_split(samples, 5, seed=1)
    assert train == sorted(train, key=samples.index) and held == sorted(held, key=samples.index)
    assert seeded_split(samples, 0, seed=0) == (samples, [])


def test_folder_with_some_masks_names_the_defective_images_without_one(tmp_path):
    for i in range(10):
        write_image(tmp_path / "good" / f"g{i}.png")
    for i in range(3):
        write_image(tmp_path / "defect" / f"d{i}.png")
    write_mask(tmp_path / "mask" / "d0-mask.png")  # a labelling tool's naming: matched too
    with pytest.raises(DataError, match=r"(?s)without its mask \(2\).*d1.png: expected .*mask/d1_mask.png"):
        Folder(str(tmp_path), normal_test_fraction=0.2, num_workers=0).setup()
    (tmp_path / "mask" / "d0-mask.png").unlink()  # no mask at all: image metrics only, no pixel metrics
    data = Folder(str(tmp_path), normal_test_fraction=0.2, num_workers=0)
    data.setup()
    assert len(data.train_samples) == 8
    assert sorted(s.label for s in data.test_samples) == [0, 0, 1, 1, 1]
    assert not data.has_pixel_ground_truth()


def test_folder_missing_normal_dir_names_it(tmp_path):
    with pytest.raises(DataError, match=r"good"):
        Folder(str(tmp_path)).setup()
