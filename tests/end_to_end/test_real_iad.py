"""Real-IAD (anomaly/data/real_iad.py) on a generated tree in the released layout: read, scored per image
and per part by hand, refused with one clear block when the tree is wrong, and run end to end.

The tree: ``realiad_jsons/realiad_jsons{,_sv}/<object>.json`` (meta, train, test; entries with category,
anomaly_class, image_path, mask_path) and ``realiad_256/<object>/OK/S0001/<object>_0001_OK_C1_<time>.jpg``,
``NG/<defect>/S0001/<object>_0001_NG_<defect>_C1_<time>.jpg`` with a ``.png`` mask where the defect shows.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly.data.real_iad import RealIAD
from anomaly.data.samples import part_numbers
from anomaly.errors import ConfigError, DataError
from anomaly.metrics import Evaluator

OBJECT = "audiojack"
SIZE = 48  # the resized releases are square
BOX = (16, 12, 30, 24)  # x0, y0, x1, y1 of a defect
LOADER = {"image_size": 48, "crop_size": None, "num_workers": 0, "batch_size": 8}
TRAIN_PARTS = 4
GOOD_TEST_PARTS = ("0005", "0006")
DEFECTIVE_PARTS = {("QS", "0001"): (1, 2), ("HS", "0002"): (3,)}  # (defect, number): views where it shows


def view_pixels(seed: int, defect: bool) -> np.ndarray:
    """A textured grey view ``[H, W, 3]`` uint8; a defect is a bright square at :data:`BOX`."""
    x = np.linspace(0, 6 * np.pi, SIZE)
    image = 128 + 50 * np.sin(x)[None] * np.cos(x)[:, None]
    image = image + np.random.default_rng(seed).normal(0, 4, image.shape)
    if defect:
        image[BOX[1] : BOX[3], BOX[0] : BOX[2]] = 255
    return np.repeat(image.clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)


def entry(kind: str, image: str, mask: str | None) -> dict:
    return {"category": OBJECT, "anomaly_class": kind, "image_path": image, "mask_path": mask}


def write_part(folder: Path, kind: str, number: str, seed: int, shows: tuple[int, ...] = ()) -> list[dict]:
    """The five views of one part as released, and their split-file entries."""
    status = "OK" if kind == "OK" else f"NG_{kind}"
    relative = Path("OK" if kind == "OK" else f"NG/{kind}") / f"S{number}"
    entries = []
    for view in range(1, 6):
        stem = f"{OBJECT}_{number}_{status}_C{view}_20231021130{200 + view}"
        pixels = view_pixels(seed * 10 + view, defect=view in shows)
        (folder / relative).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / relative / f"{stem}.jpg", quality=95)
        mask = None
        if view in shows:
            values = np.zeros((SIZE, SIZE), np.uint8)
            values[BOX[1] : BOX[3], BOX[0] : BOX[2]] = 255
            Image.fromarray(values).save(folder / relative / f"{stem}.png")
            mask = (relative / f"{stem}.png").as_posix()
        entries.append(entry(kind, (relative / f"{stem}.jpg").as_posix(), mask))
    return entries


def write_split(root: Path, name: str, train: list[dict], test: list[dict]) -> Path:
    path = root / "realiad_jsons" / name / f"{OBJECT}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"prefix": OBJECT, "normal_class": "OK", "pre_transform": False}
    path.write_text(json.dumps({"meta": meta, "train": train, "test": test}))
    return path


@pytest.fixture
def real_iad_root(tmp_path: Path) -> Path:
    """One object of Real-IAD at 256 px (here 48 px): 4 good training parts; testing, 2 good parts and 2
    defective ones (QS showing in views 1-2, HS in view 3; the other views of these parts have no mask)."""
    root = tmp_path / "Real-IAD"
    folder = root / "realiad_256" / OBJECT
    train = [e for i in range(TRAIN_PARTS) for e in write_part(folder, "OK", f"{i + 1:04d}", i)]
    test = [e for i, number in enumerate(GOOD_TEST_PARTS) for e in write_part(folder, "OK", number, 50 + i)]
    for i, ((kind, number), shows) in enumerate(DEFECTIVE_PARTS.items()):
        test += write_part(folder, kind, number, 80 + i, shows)
    write_split(root, "realiad_jsons", train, test)
    write_split(root, "realiad_jsons_sv", [e for e in train if "_C1_" in e["image_path"]],
                [e for e in test if "_C1_" in e["image_path"]])  # fmt: skip
    return root


def real_iad(root: Path, **options) -> RealIAD:
    data = RealIAD(str(root), OBJECT, **{"resolution": 256, **LOADER, **options})
    data.setup()
    return data


def test_the_released_layout_is_read_with_each_views_part_and_camera(real_iad_root):
    data = real_iad(real_iad_root)
    train, test = data.train_samples, data.test_samples
    assert len(train) == 20 and {s.label for s in train} == {0} and {s.view for s in train} == {1, 2, 3, 4, 5}
    assert {s.sample_id for s in train} == {f"{OBJECT}_{i:04d}_OK" for i in range(1, 5)}
    defective = {(s.sample_id.removeprefix(f"{OBJECT}_"), s.view) for s in test if s.label == 1}
    assert defective == {("0001_NG_QS", 1), ("0001_NG_QS", 2), ("0002_NG_HS", 3)}
    assert all(s.mask_path is not None and s.mask_path.is_file() for s in test if s.label == 1)
    hidden = [s for s in test if s.sample_id.endswith("NG_HS") and s.view != 3]  # the defect does not show
    assert len(hidden) == 4 and all(s.label == 0 and s.mask_path is None for s in hidden)
    assert hidden[0].defect_type == "HS (not in this view)"
    # OK part 0001 and NG part 0001 are different parts: the part's status is in its key
    assert len({s.sample_id for s in test}) == 4 and part_numbers(test).unique().numel() == 4
    assert data.has_pixel_ground_truth() and not data.skipped  # every file of the folder is in the split


def test_the_single_view_split_reads_one_camera_and_lists_the_others_as_skipped(real_iad_root):
    data = real_iad(real_iad_root, split="realiad_jsons_sv")
    assert {s.view for s in data.train_samples + data.test_samples} == {1}
    assert len(data.test_samples) == 4 and sum(s.label for s in data.test_samples) == 1
    not_named = [f for f in data.skipped if f.reason == "not named by realiad_jsons_sv/audiojack.json"]
    assert len(not_named) == 4 * 8 + 2  # views 2-5 of 8 parts, and the masks of views 2 and 3


def test_per_sample_metrics_equal_a_hand_computation_on_the_generated_tree(real_iad_root):
    """Scores chosen so that the max-over-views rule gives 3/4 (a mean over views: 1/2) and the
    any-view-defective rule 3/4 (the first view's label: 1/3; most views' label: undefined)."""
    views = {  # part -> its five views' scores
        f"{OBJECT}_0005_OK": [0.9, 0.1, 0.1, 0.1, 0.1],
        f"{OBJECT}_0006_OK": [0.3, 0.3, 0.3, 0.3, 0.3],
        f"{OBJECT}_0001_NG_QS": [0.8, 0.7, 0.2, 0.2, 0.2],  # defective views 1, 2
        f"{OBJECT}_0002_NG_HS": [0.05, 0.05, 0.95, 0.05, 0.05],  # defective view 3
    }
    test = real_iad(real_iad_root).test_samples
    scores = torch.tensor([views[s.sample_id][s.view - 1] for s in test])
    labels = torch.tensor([s.label for s in test])
    evaluator = Evaluator(compute_pixel_metrics=False, part_ids=part_numbers(test))
    for batch in torch.randperm(len(test), generator=torch.Generator().manual_seed(0)).split(6):
        evaluator.update(scores[batch], labels[batch], indices=batch)
    metrics = evaluator.compute()
    # parts: good .9 and .3, defective .8 and .95: .8 > .3, .95 > .9 and .3, .8 < .9
    assert metrics["sample_auroc"] == pytest.approx(3 / 4)
    assert metrics["sample_aupr"] == pytest.approx((1 / 1 + 2 / 3) / 2)  # ranked: .95 +, .9 -, .8 +, .3 -
    # images: defective .8, .7 beat 16 of the 17 good views (not .9), .95 all of them
    assert metrics["image_auroc"] == pytest.approx((16 + 16 + 17) / 51)


def test_a_split_file_naming_a_missing_file_is_one_block_naming_the_entry(real_iad_root):
    folder = real_iad_root / "realiad_256" / OBJECT
    next((folder / "NG" / "HS" / "S0002").glob("*_C3_*.png")).unlink()
    next((folder / "OK" / "S0005").glob("*_C2_*.jpg")).unlink()
    with pytest.raises(DataError) as error:
        real_iad(real_iad_root)
    message, split = str(error.value), real_iad_root / "realiad_jsons" / "realiad_jsons" / f"{OBJECT}.json"
    assert message.startswith(f"{split} names 2 file(s) that do not exist:")
    assert f"test[1] image_path: {folder}/OK/S0005/{OBJECT}_0005_OK_C2_" in message
    assert f"test[17] mask_path: {folder}/NG/HS/S0002/{OBJECT}_0002_NG_HS_C3_" in message
    assert "extract the object's archive of this release (dataset.resolution) again" in message


def test_views_of_one_part_with_different_sizes_are_one_block(real_iad_root):
    view = next((real_iad_root / "realiad_256" / OBJECT / "OK" / "S0006").glob("*_C4_*.jpg"))
    Image.fromarray(view_pixels(0, False)).resize((96, 96)).save(view)
    with pytest.raises(DataError, match=r"1 Real-IAD part\(s\) in .* have views of different sizes") as error:
        real_iad(real_iad_root)
    assert f"{OBJECT}_0006_OK: C1 {OBJECT}_0006_OK_C1_" in str(error.value) and "C4 " in str(error.value)
    assert f"{view.name} 96x96" in str(error.value) and "files of two releases were mixed" in str(error.value)


def test_layout_errors_name_what_was_expected(real_iad_root, tmp_path):
    with pytest.raises(DataError, match=r"Unknown Real-IAD object 'bottle': .*bottle.json does not exist .*"
                       r"holds the split files of: audiojack\)"):  # fmt: skip
        RealIAD(str(real_iad_root), "bottle", resolution=256, **LOADER).setup()
    with pytest.raises(DataError, match=r"Real-IAD images of 'audiojack' not found: .*realiad_1024/audiojack "
                       r"\(releases found in .*: realiad_256\)"):  # fmt: skip
        real_iad(real_iad_root, resolution="1024")
    with pytest.raises(DataError, match=r"split folder 'realiad_jsons_fuiad_0.1' not found: .*split folders "
                       r"found: realiad_jsons, realiad_jsons_sv\)"):  # fmt: skip
        real_iad(real_iad_root, split="realiad_jsons_fuiad_0.1")
    (real_iad_root / "realiad_jsons").rename(tmp_path / "elsewhere")
    missing = r"split folder 'realiad_jsons' not found: looked for .*/realiad_jsons/realiad_jsons and "
    with pytest.raises(DataError, match=missing + r".*found: none\). .*extract realiad_jsons.zip"):
        real_iad(real_iad_root)
    with pytest.raises(ConfigError, match=r"dataset.resolution must be one of 256, 512, 1024, raw"):
        RealIAD(str(real_iad_root), OBJECT, resolution=128)


def test_a_malformed_split_file_is_refused_with_the_entry(real_iad_root):
    path = real_iad_root / "realiad_jsons" / "realiad_jsons" / f"{OBJECT}.json"
    split = json.loads(path.read_text())
    split["test"][2]["image_path"] = "OK/S0005/view.jpg"
    path.write_text(json.dumps(split))
    with pytest.raises(DataError, match=r"test\[2\]: cannot tell the part and the camera from the file name "
                       r"'view.jpg'"):  # fmt: skip
        real_iad(real_iad_root)
    del split["meta"]
    path.write_text(json.dumps(split))
    with pytest.raises(DataError, match=r"must hold an object with the keys meta, train and test"):
        real_iad(real_iad_root)


@pytest.mark.slow
def test_real_iad_runs_end_to_end_with_per_sample_metrics(real_iad_root, tmp_path, run_job):
    overrides = [
        "dataset=real_iad", f"dataset.root={real_iad_root}", f"dataset.category={OBJECT}",
        "dataset.resolution=256", *(f"dataset.{key}={'null' if value is None else value}"
                                    for key, value in LOADER.items()),
        "method=padim", "logger=none", "trainer.enable_progress_bar=false",
    ]  # fmt: skip
    metrics, run_dir = run_job(tmp_path, overrides)
    assert metrics["image_auroc"] > 0.9 and metrics["pixel_auroc"] > 0.9, metrics
    assert metrics["sample_auroc"] == 1.0 and metrics["sample_aupr"] == 1.0, metrics  # 2 of 2 parts found
    written = json.loads((run_dir / "metrics.json").read_text())
    assert written["sample_auroc"] == metrics["sample_auroc"]
