"""The decoded-image cache: a sweep's later runs read each file's preprocessed pixels and its passed data
check by the file's bytes instead of decoding and checking it again, with the same tensors bit for bit."""

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision import tv_tensors

import anomaly.data.check as check_module
import anomaly.data.decoded_cache as decoded_module
from anomaly.backbones.feature_cache import FeatureStore
from anomaly.cli.cache import main as cache_main
from anomaly.data.check import check_samples
from anomaly.data.dataset import ImageDataset
from anomaly.data.decode import read_image
from anomaly.data.decoded_cache import DecodedSamples
from anomaly.data.preprocessing import Preprocessing
from anomaly.data.samples import Sample
from anomaly.data.synthetic import SyntheticAD
from anomaly.errors import DataError


def write_pair(folder: Path, name: str, seed: int, size: tuple[int, int] = (70, 90)) -> Sample:
    """A defective sample: an RGB PNG of ``size`` (height, width) and its mask with a square defect."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    image, mask = folder / f"{name}.png", folder / f"{name}_mask.png"
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(image)
    pixels = np.zeros(size, dtype=np.uint8)
    pixels[10:30, 20:40] = 255
    Image.fromarray(pixels).save(mask)
    return Sample(image, 1, mask, "crack")


def uncached(sample: Sample, preprocessing: Preprocessing) -> dict:
    return ImageDataset([sample], preprocessing.transform())[0]


def cached(sample: Sample, preprocessing: Preprocessing, root: Path) -> dict:
    decoded = DecodedSamples(FeatureStore(root, 10**9), preprocessing)
    return ImageDataset([sample], preprocessing.transform(), decoded=decoded)[0]


def assert_same(a: dict, b: dict) -> None:
    for key in ("image", "mask"):
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert (a["label"], a["path"], a["index"]) == (b["label"], b["path"], b["index"])


def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(decoded_module, "read_image_and_mask", refuse)


@pytest.mark.parametrize("preprocessing", [Preprocessing([48, 64]), Preprocessing(40, 32), Preprocessing(36)])
def test_cold_and_warm_reads_give_the_transforms_tensors_and_warm_ones_decode_nothing(
    preprocessing, tmp_path, monkeypatch
):
    defective = write_pair(tmp_path / "data", "a", seed=0)
    good = Sample(tmp_path / "data" / "a.png", 0, None, "good")
    samples = (defective, good)
    expected = [uncached(sample, preprocessing) for sample in samples]
    for sample, reference in zip(samples, expected, strict=True):  # cold: decoded and stored
        assert_same(cached(sample, preprocessing, tmp_path / "cache"), reference)
    assert len(list((tmp_path / "cache").glob("*/*.safetensors"))) == 2  # another mask: another key
    no_decoding(monkeypatch)
    for sample, reference in zip(samples, expected, strict=True):  # warm: read
        assert_same(cached(sample, preprocessing, tmp_path / "cache"), reference)


def test_the_key_is_the_files_bytes_and_the_preprocessing_not_the_path_or_time(tmp_path, monkeypatch):
    sample = write_pair(tmp_path / "data", "a", seed=0)
    preprocessing = Preprocessing([48, 64])
    cached(sample, preprocessing, tmp_path / "cache")
    moved = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "data", moved)
    for path in moved.iterdir():
        os.utime(path, (1_000_000, 1_000_000))
    copy = Sample(moved / "a.png", 1, moved / "a_mask.png", "crack")
    stored = lambda: len(list((tmp_path / "cache").glob("*/*.safetensors")))  # noqa: E731
    cached(copy, preprocessing, tmp_path / "cache")
    assert stored() == 1  # the same bytes elsewhere, touched: the same entry
    cached(sample, Preprocessing([40, 64]), tmp_path / "cache")
    assert stored() == 2  # another size
    other = write_pair(tmp_path / "other", "a", seed=1)  # other pixels, the same mask bytes
    cached(Sample(other.image_path, 1, sample.mask_path, "crack"), preprocessing, tmp_path / "cache")
    assert stored() == 3
    mask = np.array(Image.open(sample.mask_path))
    mask[0, 0] = 255
    Image.fromarray(mask).save(copy.mask_path)  # the same image, another mask
    expected = uncached(copy, preprocessing)
    assert_same(cached(copy, preprocessing, tmp_path / "cache"), expected)
    assert stored() == 4


def test_a_folder_of_masks_is_keyed_on_its_files(tmp_path, monkeypatch):
    """MVTec LOCO AD: one mask file per defect, read as their union."""
    sample = write_pair(tmp_path / "data", "a", seed=0)
    folder = tmp_path / "data" / "a_masks"
    folder.mkdir()
    sample.mask_path.rename(folder / "000.png")
    second = np.zeros((70, 90), dtype=np.uint8)
    second[50:60, 5:15] = 255
    Image.fromarray(second).save(folder / "001.png")
    sample = Sample(sample.image_path, 1, folder, "logical")
    preprocessing = Preprocessing([48, 64])
    expected = uncached(sample, preprocessing)
    assert_same(cached(sample, preprocessing, tmp_path / "cache"), expected)
    with monkeypatch.context() as patch:
        no_decoding(patch)
        assert_same(cached(sample, preprocessing, tmp_path / "cache"), expected)
    second[0:5, 0:5] = 255
    Image.fromarray(second).save(folder / "001.png")  # one defect's mask changed: another key
    assert_same(cached(sample, preprocessing, tmp_path / "cache"), uncached(sample, preprocessing))
    assert len(list((tmp_path / "cache").glob("*/*.safetensors"))) == 2


def test_a_file_gone_since_the_check_is_the_decoders_error_naming_it(tmp_path):
    sample = write_pair(tmp_path / "data", "a", seed=0)
    sample.image_path.unlink()
    with pytest.raises(DataError, match=f"Cannot read image {sample.image_path}.*Replace the file"):
        cached(sample, Preprocessing(32), tmp_path / "cache")


def test_a_damaged_entry_is_named_deleted_and_decoded_again(tmp_path, caplog):
    sample = write_pair(tmp_path / "data", "a", seed=0)
    preprocessing = Preprocessing([48, 64])
    expected = uncached(sample, preprocessing)
    cached(sample, preprocessing, tmp_path / "cache")
    (path,) = (tmp_path / "cache").glob("*/*.safetensors")
    save_file({"image": torch.zeros(3, 10, 10, dtype=torch.uint8)}, path)  # another size, no mask
    with caplog.at_level(logging.WARNING):
        assert_same(cached(sample, preprocessing, tmp_path / "cache"), expected)
    assert str(path) in caplog.text and "deleted" in caplog.text
    path.write_bytes(b"not a safetensors file")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert_same(cached(sample, preprocessing, tmp_path / "cache"), expected)
    assert str(path) in caplog.text and "unreadable" in caplog.text


def test_a_passed_check_is_remembered_by_content_and_a_problem_never(tmp_path, monkeypatch):
    good = write_pair(tmp_path / "data", "good", seed=0)
    broken = write_pair(tmp_path / "data", "broken", seed=1)
    broken.image_path.write_bytes(broken.image_path.read_bytes()[:300])  # truncated
    decoded = DecodedSamples(FeatureStore(tmp_path / "cache", 10**9), Preprocessing(32))
    checked: list[Path] = []
    real_check = check_module.check_sample
    monkeypatch.setattr(check_module, "check_sample", lambda s: checked.append(s.image_path) or real_check(s))

    first = check_samples([good, broken], decoded=decoded)
    assert [problem.sample for problem in first] == [broken]
    assert sorted(checked) == sorted([good.image_path, broken.image_path])  # (checked on threads)
    checked.clear()
    again = check_samples([good, broken], decoded=decoded)
    assert again == first and checked == [
        broken.image_path
    ]  # the good pair is not read again; the bad one is
    pixels = np.array(Image.open(good.image_path))
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(good.image_path)  # new content: checked again
    checked.clear()
    check_samples([good], decoded=decoded)
    assert checked == [good.image_path]
    Image.fromarray(np.zeros((70, 90), dtype=np.uint8)).save(good.mask_path)  # an all-zero mask now
    assert [problem.kind for problem in check_samples([good], decoded=decoded)] == ["empty_mask"]


def test_a_data_modules_batches_are_the_same_with_and_without_the_cache(tmp_path, monkeypatch, capsys):
    def batches(store: FeatureStore | None) -> list[dict]:
        datamodule = SyntheticAD(
            root=str(tmp_path / "data"), category="fabric", image_size=[32, 32], crop_size=None, batch_size=4,
            num_workers=0, n_train=6, n_test_good=2, n_test_defect=3,
        )  # fmt: skip
        datamodule.use_cache(store)
        datamodule.setup()
        return [*datamodule.train_dataloader(), *datamodule.test_dataloader()]

    reference = batches(None)
    store = FeatureStore(tmp_path / "cache", 10**9)
    for warm in (False, True):
        if warm:
            no_decoding(monkeypatch)
        for a, b in zip(reference, batches(store), strict=True):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
            assert a["path"] == b["path"]
    cache_main(["info", str(tmp_path / "cache")])  # 6 + 5 decoded images and their 11 passed checks
    out = capsys.readouterr().out
    assert "0 images' features" in out and "22 decoded images" in out
    cache_main(["clear", str(tmp_path / "cache")])
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_the_cached_pixels_are_the_decoders(tmp_path):
    """The stored value is the decoder's output through the geometric steps only (no float rounding in it)."""
    sample = write_pair(tmp_path / "data", "a", seed=2)
    preprocessing = Preprocessing([48, 64])
    cached(sample, preprocessing, tmp_path / "cache")
    (path,) = (tmp_path / "cache").glob("*/*.safetensors")
    from safetensors.torch import load_file

    stored = load_file(path)
    expected = preprocessing.geometric()(tv_tensors.Image(read_image(sample.image_path)))
    assert stored["image"].dtype == torch.uint8 and torch.equal(stored["image"], expected)


def test_an_unwritable_cache_warns_once_for_features_and_decoded_images(tmp_path, caplog):
    (tmp_path / "a_file").touch()
    store = FeatureStore(tmp_path / "a_file" / "cache", 10**9)  # under a file: every write refused
    sample = write_pair(tmp_path / "data", "a", seed=0)
    preprocessing = Preprocessing(32)
    decoded = DecodedSamples(store.within("decoded"), preprocessing)
    with caplog.at_level(logging.WARNING):
        image, _ = decoded.load(sample)
        store.write("ab" * 32, {"x": torch.zeros(1)}, {})
    assert torch.equal(image, uncached(sample, preprocessing)["image"])  # no cache, the same tensors
    assert caplog.text.count("cannot write") == 1
