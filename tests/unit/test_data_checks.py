"""Messy folders: every bad file named at once before any work, nothing skipped in silence, masks in any
convention, and both decoders giving the same pixels."""

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly.data import decode
from anomaly.data.decode import read_image, read_mask, read_with_pil, torchcodec_decoder
from anomaly.data.folder import Folder
from anomaly.data.mvtec import MVTecAD
from anomaly.errors import ConfigError, DataError
from anomaly.methods.padim.model import Padim

RNG = np.random.default_rng(0)


def write_image(path: Path, size=(40, 30), seed=0, fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def write_mask(path: Path, size=(40, 30), value=255, box=(10, 5, 20, 15)) -> Path:
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[box[1] : box[3], box[0] : box[2]] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)
    return path


def mvtec_category(root: Path, n_train=4) -> Path:
    category = root / "widget"
    for i in range(n_train):
        write_image(category / "train" / "good" / f"{i:03d}.png", seed=i)
    write_image(category / "test" / "good" / "000.png", seed=10)
    for i in range(2):
        write_image(category / "test" / "crack" / f"{i:03d}.png", seed=20 + i)
        write_mask(category / "ground_truth" / "crack" / f"{i:03d}_mask.png")
    return root


def test_a_folder_of_mixed_bad_files_reports_all_of_them_in_one_run(tmp_path):
    root = mvtec_category(tmp_path, n_train=8)
    train, test, truth = (
        root / "widget" / part for part in ("train/good", "test/crack", "ground_truth/crack")
    )
    (train / "000.png").write_bytes((train / "000.png").read_bytes()[:200])  # truncated
    (train / "001.png").write_bytes(b"")  # zero bytes
    (train / "002.png").write_text("just some text")  # text named .png
    (train / "broken.png").symlink_to(tmp_path / "nowhere.png")  # broken link
    (train / "loop.png").symlink_to(train / "loop.png")  # a link to itself
    write_image(test / "002.png", seed=3)  # no mask for it
    write_mask(truth / "001_mask.png", value=0)  # all-zero mask of a defective image
    write_mask(truth / "000_mask.png", size=(41, 30))  # wrong size
    with pytest.raises(DataError) as error:
        MVTecAD(str(root), "widget", image_size=32, crop_size=None, num_workers=0).setup()
    message = str(error.value)
    for expected in ("unreadable image (3)", "000.png", "001.png", "002.png", "empty file",
                     "image missing or a broken link (2)", "broken.png", "loop.png",
                     "without its mask (1)", "002_mask.png", "no defect pixel (1)",
                     "001_mask.png is all zero",
                     "another size than its image (1)", "dataset.on_bad_file=skip"):  # fmt: skip
        assert expected in message, expected


def test_skip_leaves_bad_files_out_and_lists_them(tmp_path, caplog):
    root = mvtec_category(tmp_path)
    (root / "widget" / "train" / "good" / "001.png").write_bytes(b"\x89PNG broken")
    data = MVTecAD(str(root), "widget", image_size=32, crop_size=None, num_workers=0, on_bad_file="skip")
    with caplog.at_level(logging.INFO):
        data.setup()
    assert [p.sample.image_path.name for p in data.bad_files] == ["001.png"]
    assert len(data.train_samples) == 3 and "001.png" in caplog.text and "train 3 images" in caplog.text


def test_masks_in_any_nonzero_convention_give_the_same_ground_truth(tmp_path):
    image = write_image(tmp_path / "a.png")
    expected = read_mask(write_mask(tmp_path / "m255.png", value=255), image, (40, 30))
    assert expected.sum() == 100
    for name, value in (("m1.png", 1), ("m7.png", 7)):  # 0/1 exports, class ids (VisA)
        assert torch.equal(read_mask(write_mask(tmp_path / name, value=value), image, (40, 30)), expected)
    palette = Image.fromarray(np.asarray(Image.open(tmp_path / "m1.png"))).convert("P")
    palette.save(tmp_path / "palette.png")
    assert torch.equal(read_mask(tmp_path / "palette.png", image, (40, 30)), expected)
    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[5:15, 10:20] = (0, 0, 1)  # dark blue: zero as grey, still a defect
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert torch.equal(read_mask(tmp_path / "rgb.png", image, (40, 30)), expected)


def test_zero_one_masks_give_the_same_metrics_as_zero_255(tmp_path, tiny_backbone, score_test_set):
    results = []
    for value in (255, 1):
        root = tmp_path / str(value)
        mvtec_category(root, n_train=6)
        for mask in (root / "widget" / "ground_truth" / "crack").glob("*.png"):
            write_mask(mask, value=value)
        data = MVTecAD(str(root), "widget", image_size=32, crop_size=None, num_workers=0)
        data.setup()
        results.append(data)
    model = Padim(tiny_backbone(), n_features=10)
    for batch in results[0].train_dataloader():
        model.collect(batch["image"])
    model.fit()
    assert score_test_set(model, results[0]) == score_test_set(model, results[1])


def test_every_format_the_decoder_reads_is_used_and_the_rest_is_listed(tmp_path, caplog):
    good = tmp_path / "good"
    for i in range(4):
        write_image(good / f"{i}.webp", seed=i, fmt="WEBP")
    write_image(good / "5.tiff", seed=5)
    (good / "notes.txt").write_text("inspection notes")
    (good / ".DS_Store").write_bytes(b"\0")
    (good / "subfolder").mkdir()
    data = Folder(str(tmp_path), normal_test_fraction=0.2, num_workers=0, calibration_fraction=0.0)
    with caplog.at_level(logging.INFO):
        data.setup()
    assert len(data.train_samples) + len(data.test_samples) == 5
    reasons = {f.path.name: f.reason for f in data.skipped}
    assert reasons[".DS_Store"] == "hidden file" and reasons["subfolder"] == "folder"
    assert reasons["notes.txt"].startswith("not an image extension (.txt")
    assert "3 file(s) not used" in caplog.text and "train 4 images" in caplog.text


def test_config_values_are_checked_when_the_data_module_is_built():
    for bad in ({"image_size": 0}, {"image_size": [256]}, {"crop_size": -1}, {"batch_size": 0},
                {"num_workers": -1}, {"calibration_fraction": 1.0}, {"on_bad_file": "ignore"}):  # fmt: skip
        with pytest.raises(ConfigError):
            MVTecAD("/nowhere", "widget", **bad)


def png_16_bit_rgb(path: Path, values: np.ndarray) -> Path:
    """A 16-bit RGB PNG written by hand (PIL cannot write one)."""
    height, width, _ = values.shape
    raw = b"".join(b"\0" + values[row].astype(">u2").tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    return path


def decoder_test_files(folder: Path) -> dict[str, Path]:
    rgb = RNG.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    images = {
        "rgb.png": Image.fromarray(rgb), "rgba.png": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
        "grey.png": Image.fromarray(rgb[..., 0]),
        "grey_alpha.png": Image.fromarray(rgb[..., 0]).convert("LA"),
        "one_bit.png": Image.fromarray(rgb[..., 0] > 128), "palette.png": Image.fromarray(rgb).convert("P"),
        "rgb.jpg": Image.fromarray(rgb), "grey.jpeg": Image.fromarray(rgb[..., 0]),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"), "rgb.bmp": Image.fromarray(rgb),
        "rgb.tiff": Image.fromarray(rgb), "rgb.webp": Image.fromarray(rgb),
        "grey16.png": Image.fromarray(RNG.integers(0, 65536, (12, 20)).astype(np.uint16)),
    }  # fmt: skip
    paths = {}
    for name, image in images.items():
        paths[name] = folder / name
        image.save(paths[name], **({"lossless": True} if name.endswith("webp") else {}))
    rotated = Image.fromarray(rgb)
    exif = rotated.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90° clockwise for display
    rotated.save(folder / "exif_rotated.jpg", exif=exif.tobytes())
    paths["exif_rotated.jpg"] = folder / "exif_rotated.jpg"
    paths["jpeg_named.png"] = folder / "jpeg_named.png"
    paths["jpeg_named.png"].write_bytes(paths["rgb.jpg"].read_bytes())
    paths["rgb16.png"] = png_16_bit_rgb(folder / "rgb16.png", RNG.integers(0, 65536, (12, 20, 3)))
    return paths


@pytest.mark.skipif(torchcodec_decoder() is None, reason="torchcodec is not usable here")
def test_torchcodec_and_pil_give_identical_pixels_on_the_same_files(tmp_path):
    for name, path in decoder_test_files(tmp_path).items():
        assert torch.equal(read_image(path), read_with_pil(path)), name
        if path.suffix in decode.TORCHCODEC_EXTENSIONS and not name.endswith("16.png"):  # 16 bit: PIL only
            assert torch.equal(torchcodec_decoder()(str(path), mode="RGB"), read_with_pil(path)), name


def test_without_torchcodec_images_decode_with_pil_and_16_bit_is_scaled(tmp_path, monkeypatch):
    monkeypatch.setattr(decode, "torchcodec_decoder", lambda: None)
    paths = decoder_test_files(tmp_path)
    for path in paths.values():
        image = read_image(path)
        assert image.dtype == torch.uint8 and image.shape[0] == 3
    grey16 = np.asarray(Image.open(paths["grey16.png"]), dtype=np.int64)
    assert torch.equal(read_image(paths["grey16.png"])[0], torch.from_numpy((grey16 >> 8).astype(np.uint8)))
    assert read_image(paths["grey16.png"]).max() > 200  # scaled, not clipped at 255 of 65535
    assert read_image(paths["exif_rotated.jpg"]).shape[-2:] == (20, 12)  # orientation applied
