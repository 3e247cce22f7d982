"""Detector.score refuses what it cannot score with a clear error that says what it takes (issue 28)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly.data.preprocessing import Preprocessing
from anomaly.detector import Detector
from anomaly.errors import DataError, UserError
from anomaly.methods.padim.model import Padim

SIZE = 64


@pytest.fixture(scope="module")
def detector(tiny_backbone, smooth_images) -> Detector:
    model = Padim(tiny_backbone(), n_features=8)
    model.collect(smooth_images(4, seed=0))
    model.fit()
    return Detector(model, "padim", Preprocessing(image_size=SIZE), None, torch.device("cpu"))


def image_array(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((SIZE, SIZE, 3)).astype(np.float32)


def test_nan_pixels_are_refused_naming_the_image_of_the_batch(detector):
    bad = image_array(1)
    bad[10:30, 10:30] = np.nan  # 400 NaN pixels, as in the issue
    with pytest.raises(DataError, match=r"image 1: 1200 of its values are not finite"):
        detector.score([image_array(0), bad])


def test_an_empty_list_is_refused(detector):
    with pytest.raises(DataError, match=r"got no images \(an empty list\).*file paths, PIL images"):
        detector.score([])


def test_a_number_is_refused_saying_what_is_accepted(detector):
    with pytest.raises(DataError, match=r"cannot score a int: it takes file paths"):
        detector.score(42)


def test_a_dict_is_refused_not_read_as_file_names(detector, tmp_path):
    path = tmp_path / "image.png"
    Image.fromarray((image_array() * 255).astype(np.uint8)).save(path)
    with pytest.raises(DataError, match=r"a dict \(keys \['image'\]\): pass the image itself"):
        detector.score({"image": path})


def test_encoded_png_bytes_are_refused_with_how_to_decode_them(detector):
    buffer = io.BytesIO()
    Image.fromarray((image_array() * 255).astype(np.uint8)).save(buffer, format="PNG")
    with pytest.raises(DataError, match=r"bytes \(encoded file contents\?\): decode them first"):
        detector.score(buffer.getvalue())
    with pytest.raises(UserError, match=r"image 0: cannot score .* bytes"):
        detector.score([buffer.getvalue()])


def test_uint16_images_score_as_their_high_byte_as_16_bit_files_do(detector):
    eight = (image_array() * 255).astype(np.uint8)
    sixteen = eight.astype(np.uint16) * 256 + 77  # the low byte does not count, as for 16-bit PNGs
    expected = detector.score(eight)
    for image in (sixteen, torch.from_numpy(sixteen).permute(2, 0, 1)):
        torch.testing.assert_close(detector.score(image).anomaly_maps, expected.anomaly_maps)


def test_other_integer_types_are_refused_naming_the_type(detector):
    with pytest.raises(DataError, match=r"image 0: cannot score an image of int32: pass uint8"):
        detector.score(np.zeros((SIZE, SIZE, 3), dtype=np.int32))
