"""anomaly-update: new good parts learnt without a refit, written to a new file with its lineage."""

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from anomaly.backbones.patch_features import PatchFeatures
from anomaly.cli.update import update
from anomaly.config import config_dir
from anomaly.data.synthetic import generate_dataset
from anomaly.errors import ConfigError
from anomaly.methods.patchcore.coreset import ApproximateGreedyCoreset, random_projection
from anomaly.methods.patchcore.model import PatchCore
from anomaly.methods.patchcore.reproducible import projection_matrix
from anomaly.model_io import load_model

pytestmark = pytest.mark.slow  # commands and whole runs: seconds to a minute each


def brute_force_extension(bank: np.ndarray, new: np.ndarray, count: int) -> list[int]:
    """Greedy k-center over ``new`` starting from the selection ``bank``, from full distance matrices."""
    min_dist = np.linalg.norm(new[:, None] - bank[None], axis=-1).min(axis=1)
    within = np.linalg.norm(new[:, None] - new[None], axis=-1)
    selected = []
    for _ in range(count):
        index = int(np.argmax(min_dist))
        selected.append(index)
        min_dist = np.minimum(min_dist, within[:, index])
    return selected


def test_coreset_extension_is_the_greedy_run_started_from_the_old_selection():
    generator = torch.Generator().manual_seed(0)
    old, new = torch.randn(400, 40, generator=generator), torch.randn(300, 40, generator=generator) + 0.5
    sampler = ApproximateGreedyCoreset(0.1, projection_dim=16, seed=2)
    bank = old[sampler.select(old)]
    added = sampler.extend(bank, new)
    # in the same seeded projection as select(): the first draw of Generator(seed)
    matrix = projection_matrix(40, 16, torch.Generator().manual_seed(2), new.device)
    expected = brute_force_extension((bank @ matrix).double().numpy(), (new @ matrix).double().numpy(), 30)
    assert added.tolist() == expected
    assert len(added) == 30  # int(300 * 0.1): the ratio holds for the new patches too
    assert random_projection(old, 16, torch.Generator().manual_seed(2), torch.float32).shape == (400, 16)


def test_patchcore_update_keeps_the_bank_and_covers_the_new_parts(tiny_backbone, smooth_images):
    features = PatchFeatures(
        tiny_backbone(layers=("stage2", "stage3")), pre_embed_dim=32, target_embed_dim=32
    )
    model = PatchCore(features, coreset_ratio=0.25, coreset_dtype="float32", knn_backend="torch")
    model.collect(smooth_images(8, seed=0))
    model.fit()
    old_bank = model.memory_bank.clone()
    new_parts = smooth_images(4, seed=1) * 0.5 + 0.45  # brighter good parts the model has not seen
    before = model(new_parts).image_score
    model.update([new_parts])
    assert torch.equal(model.memory_bank[: len(old_bank)], old_bank)
    assert len(model.memory_bank) == len(old_bank) + int(4 * 64 * 0.25)
    assert (model(new_parts).image_score < before).all()  # the new parts are now known


@pytest.fixture(scope="module")
def fitted_runs(tmp_path_factory, run_training):
    runs = {}
    for method in ("padim", "patchcore"):
        folder = tmp_path_factory.mktemp(method)
        overrides = [f"method={method}", "logger=none", "dataset.calibration_fraction=0"]
        runs[method] = run_training(folder, overrides)[1]
    return runs


@pytest.mark.parametrize("method", ["padim", "patchcore"])
def test_anomaly_update_writes_a_new_file_with_lineage_and_a_recalibrated_threshold(
    method, fitted_runs, tmp_path
):
    run_dir = fitted_runs[method]
    generate_dataset(
        tmp_path / "new", ["fabric"], n_train=6, n_test_good=1, n_test_defect=1, image_size=128, seed=5
    )
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("update", [f"model={run_dir}", f"input={tmp_path / 'new' / 'fabric' / 'train'}",
                                 "num_workers=0", "device=cpu",
                                 f"cache_dir={tmp_path / 'cache'}"])  # fmt: skip
    before = (run_dir / "model.safetensors").read_bytes()
    output = update(cfg)
    assert output.parent == run_dir and output.name.startswith("model.updated-")
    assert (run_dir / "model.safetensors").read_bytes() == before  # the old file is untouched
    old, new = load_model(run_dir), load_model(output)
    assert new.lineage[-1]["added_images"] == 6 and new.lineage[-1]["parent"].endswith("model.safetensors")
    assert new.calibration.num_images == old.calibration.num_images + 6
    if method == "padim":
        assert int(new.model.count) == int(old.model.count) + 6
    else:
        assert len(new.model.memory_bank) > len(old.model.memory_bank)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        again = compose(
            "update", [f"model={run_dir}", f"input={tmp_path / 'new'}", f"output={output}", "cache=false"]
        )
    with pytest.raises(ConfigError, match="never overwrites"):
        update(again)


@pytest.mark.parametrize("method", ["padim", "patchcore"])
def test_an_update_with_the_feature_cache_writes_the_model_of_one_without(
    method, fitted_runs, tmp_path, capsys
):
    """The new images pass the backbone twice (scored under the old model, then learnt): with the cache the
    second pass reads what the first computed, and the new model and thresholds are the uncached update's,
    bit for bit."""
    generate_dataset(
        tmp_path / "new", ["fabric"], n_train=6, n_test_good=1, n_test_defect=1, image_size=128, seed=5
    )
    written, new_parts = {}, tmp_path / "new" / "fabric" / "train"
    for cache in ("false", "true"):
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose("update", [f"model={fitted_runs[method]}", f"input={new_parts}",
                                     f"output={tmp_path / f'cache-{cache}.safetensors'}", f"cache={cache}",
                                     f"cache_dir={tmp_path / 'cache'}", "num_workers=0", "device=cpu",
                                     "batch_size=4"])  # fmt: skip
        written[cache] = update(cfg)
    assert "6 images read, 6 computed" in capsys.readouterr().out  # 6 new images: each computed once
    uncached, cached = (load_file(written[cache]) for cache in ("false", "true"))
    assert uncached.keys() == cached.keys()
    assert all(torch.equal(uncached[key], cached[key]) for key in uncached)
    assert load_model(written["true"]).calibration == load_model(written["false"]).calibration
