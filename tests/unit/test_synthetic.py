"""The generated data set: MVTec AD's layout, binary masks where the defects are, bytes fixed by the seed,
stale categories regenerated."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from anomaly.data.synthetic import CATEGORIES, DEFECT_TYPES, ensure_dataset, generate_dataset

SMALL = {"n_train": 4, "n_test_good": 2, "n_test_defect": 5, "image_size": 64}


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in root.rglob("*") if path.is_file()}


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("synthetic"), CATEGORIES, **SMALL)


def test_layout_follows_mvtec(dataset):
    for category in CATEGORIES:
        folder = dataset / category
        assert [p.name for p in pngs(folder / "train" / "good")] == [f"{i:03d}.png" for i in range(4)]
        assert len(pngs(folder / "test" / "good")) == 2
        defects = sorted(p.name for p in (folder / "test").iterdir() if p.name != "good")
        assert set(defects) <= set(DEFECT_TYPES)
        assert all(pngs(folder / "test" / d) for d in defects), "only defect types in use get a folder"
        assert sum(len(pngs(folder / "test" / d)) for d in defects) == 5
        assert sorted(p.name for p in (folder / "ground_truth").iterdir()) == defects
        for path in folder.rglob("*.png"):
            with Image.open(path) as image:
                assert image.size == (64, 64)
                assert image.mode == ("L" if path.stem.endswith("_mask") else "RGB")


def test_every_defect_has_a_binary_nonempty_mask(dataset):
    for category in CATEGORIES:
        for folder in (dataset / category / "test").iterdir():
            for image in pngs(folder):
                mask_path = dataset / category / "ground_truth" / folder.name / f"{image.stem}_mask.png"
                if folder.name == "good":
                    assert not mask_path.exists()
                    continue
                values = set(np.unique(read(mask_path)).tolist())
                assert values == {0, 255}, f"{mask_path} has values {values}"


def test_same_seed_same_bytes_whatever_else_is_generated(tmp_path):
    one = generate_dataset(tmp_path / "one", ["fabric", "washer"], seed=3, **SMALL)
    two = generate_dataset(tmp_path / "two", ["washer"], seed=3, **SMALL)
    other = generate_dataset(tmp_path / "other", ["washer"], seed=4, **SMALL)
    washer = file_bytes(one / "washer")
    assert washer == file_bytes(two / "washer")
    other_washer = file_bytes(other / "washer")
    differing = [name for name in washer if name.endswith(".png") and washer[name] != other_washer.get(name)]
    assert len(differing) >= 4 + 2 + 5


def test_ensure_dataset_regenerates_only_stale_categories(tmp_path):
    ensure_dataset(tmp_path, ["tile"], **SMALL)
    marker = tmp_path / "tile" / ".complete"
    assert json.loads(marker.read_text())["n_train"] == 4
    sentinel = tmp_path / "tile" / "sentinel"
    sentinel.touch()
    ensure_dataset(tmp_path, ["tile"], **SMALL)
    assert sentinel.exists(), "a complete category with the same parameters must be kept"

    marker.unlink()  # generation is atomic, so a folder without marker is someone else's data: refuse it
    with pytest.raises(FileExistsError, match="not written by the generator"):
        ensure_dataset(tmp_path, ["tile"], **SMALL)
    marker.write_text("{}")  # a marker with other parameters: regenerate

    ensure_dataset(tmp_path, ["tile"], **{**SMALL, "n_train": 3})
    assert not sentinel.exists()
    assert len(pngs(tmp_path / "tile" / "train" / "good")) == 3
    assert json.loads(marker.read_text())["n_train"] == 3
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".generation.lock", "tile"], "no staging folder may be left behind (the lock file stays)"


def test_unknown_category_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic category"):
        generate_dataset(tmp_path, ["bottle"], **SMALL)


def local_statistics(path: Path) -> np.ndarray:
    """Local mean and contrast per channel: the crudest texture-aware features (pixels alone cannot
    compare two textures whose pattern is shifted)."""
    image = read(path) / 255.0
    mean = ndimage.gaussian_filter(image, (1, 1, 0))
    contrast = np.sqrt(ndimage.gaussian_filter((image - mean) ** 2, (1, 1, 0)))
    return np.concatenate([mean, contrast], axis=-1)


def test_defects_stand_out_where_the_mask_says(dataset):
    """Distance to the nearest training image is larger inside each mask than outside it."""
    ratios = []
    for category in CATEGORIES:
        train = [local_statistics(path) for path in pngs(dataset / category / "train" / "good")]
        for mask_path in (dataset / category / "ground_truth").rglob("*_mask.png"):
            image = dataset / category / "test" / mask_path.parent.name / mask_path.name.replace("_mask", "")
            features = local_statistics(image)
            distance = min((np.abs(features - t).sum(-1) for t in train), key=np.mean)
            mask = read(mask_path) > 0
            ratios.append(distance[mask].mean() / distance[~mask].mean())
    assert min(ratios) > 1.2
    assert np.mean(ratios) > 3.0
