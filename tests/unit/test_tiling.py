"""Tiling: tiles cover the image and stitch back, each position's model sees its own tiles, a tiled model
round-trips through its file, trained methods train on tiles, and defects of a few pixels that a resized
run misses are found by a tiled run (measured against the masks at full resolution)."""

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from anomaly.backbones import FeatureExtractor
from anomaly.backbones.patch_features import PatchFeatures
from anomaly.data.preprocessing import Preprocessing
from anomaly.data.synthetic import SyntheticAD
from anomaly.errors import ConfigError
from anomaly.experiment import tiling_of
from anomaly.methods.padim.model import Padim
from anomaly.methods.simplenet.model import SimpleNet
from anomaly.methods.simplenet.module import SimpleNetModule
from anomaly.methods.tiling import TiledFitOnceModel, TiledTrainedModel, Tiling, tile_model
from anomaly.metrics.full_resolution import full_resolution_metrics
from anomaly.model_io import load_model, save_model

RESNET = {"name": "resnet18", "layers": ["layer1", "layer2"], "weights": None}


def test_tiles_stitch_back_and_overlaps_are_averaged():
    tiling = Tiling(32, 16, (64, 48))
    assert tiling.offsets == [(0, 0), (0, 16), (16, 0), (16, 16), (32, 0), (32, 16)]
    images = torch.rand(2, 1, 64, 48)
    tiles = tiling.split(images)
    assert tiles.shape == (2, 6, 1, 32, 32)
    assert torch.equal(tiles[:, 3], images[..., 16:48, 16:48])
    assert torch.allclose(tiling.stitch(tiles), images)
    constant = torch.arange(6.0).view(1, 6, 1, 1, 1).expand(1, 6, 1, 32, 32)  # tile i is all i
    stitched = tiling.stitch(constant)[0, 0]
    assert stitched[0, 0] == 0 and stitched[63, 47] == 5
    assert stitched[20, 20] == 1.5  # under tiles 0, 1, 2, 3: their mean


def test_sizes_the_tiles_do_not_cover_are_refused_with_sizes_that_fit():
    with pytest.raises(ConfigError, match=r"height of 100 px .* in 32, 48, 64, 80, 96, 112"):
        Tiling(32, 16, (100, 64))
    with pytest.raises(ConfigError, match=r"stride \(48\) above tiling.tile_size \(32\)"):
        Tiling(32, 48, (64, 64))
    settings = OmegaConf.create({"tiling": {"tile_size": 32, "stride": None, "per_position": False}})
    with pytest.raises(ConfigError, match=r"dataset.image_size=\[height, width\]"):
        tiling_of(settings, Preprocessing(256))  # an int resizes the shorter side: sizes vary
    assert tiling_of(settings, Preprocessing([64, 96])) == Tiling(32, 32, (64, 96))


def test_each_position_fits_its_own_tiles(tiny_backbone, smooth_images):
    tiling = Tiling(32, 32, (64, 64), per_position=True)
    tiled = tile_model(lambda: Padim(tiny_backbone(), n_features=10, seed=3), tiling)
    assert isinstance(tiled, TiledFitOnceModel) and len(tiled.models) == 4
    images = smooth_images(6, 0)
    tiled.collect(images)
    tiled.fit()
    for i, (top, left) in enumerate(tiling.offsets):
        alone = Padim(tiny_backbone(), n_features=10, seed=3)
        alone.collect(images[..., top : top + 32, left : left + 32])
        alone.fit()
        assert torch.allclose(tiled.models[i].mean, alone.mean)
    output = tiled.eval()(images)
    assert output.anomaly_map.shape == (6, 1, 64, 64)
    assert torch.equal(output.image_score, output.anomaly_map.amax(dim=(1, 2, 3)))


def test_each_position_learns_all_its_new_tiles_in_one_update(tiny_backbone, smooth_images, monkeypatch):
    tiling = Tiling(32, 32, (64, 64), per_position=True)
    tiled = tile_model(lambda: Padim(tiny_backbone(), n_features=10, seed=3), tiling)
    old, new = smooth_images(6, 0), smooth_images(6, 1)
    tiled.collect(old)
    tiled.fit()
    updates = []
    update = Padim.update
    monkeypatch.setattr(Padim, "update", lambda model, batches: updates.append(update(model, list(batches))))
    tiled.update(new.split(2))  # three batches
    assert len(updates) == 4  # one per position, over all three batches
    for i, (top, left) in enumerate(tiling.offsets):
        alone = Padim(tiny_backbone(), n_features=10, seed=3)
        alone.collect(torch.cat([old, new])[..., top : top + 32, left : left + 32])
        alone.fit()
        assert int(tiled.models[i].count) == 12
        torch.testing.assert_close(tiled.models[i].mean, alone.mean, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:backbone resnet18 is randomly initialised")
def test_a_per_position_model_stores_its_shared_backbone_once_and_reloads_identically(tmp_path):
    tiling = Tiling(32, 32, (64, 64), per_position=True)
    tiled = tile_model(lambda: Padim(FeatureExtractor(**RESNET), n_features=10, seed=3), tiling)
    assert all(model.backbone is tiled.models[0].backbone for model in tiled.models)
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    tiled.collect(images)
    tiled.fit()
    config = {"_target_": "anomaly.methods.padim.model.Padim", "n_features": 10, "seed": 3,
              "backbone": {"_target_": "anomaly.backbones.FeatureExtractor", **RESNET}}  # fmt: skip
    path = tmp_path / "model.safetensors"
    save_model(tiled, "padim", config, Preprocessing([64, 64]), path, tiling=tiling)
    with safe_open(str(path), framework="pt") as file:
        stored = {key.split(".backbone.")[0] for key in file.keys() if ".backbone." in key}  # noqa: SIM118
    assert stored == {"models.0"}  # random weights are stored, once
    loaded = load_model(path)
    assert loaded.tiling == tiling and all(
        m.backbone is loaded.model.models[0].backbone for m in loaded.model.models
    )
    assert torch.equal(loaded.model(images).anomaly_map, tiled.eval()(images).anomaly_map)


def test_a_trained_method_trains_one_shared_model_on_tiles(tiny_backbone, smooth_images):
    def build() -> SimpleNet:
        features = PatchFeatures(tiny_backbone(), pre_embed_dim=32, target_embed_dim=32)
        return SimpleNet(features, discriminator_hidden=32, noise_std=0.008, blur_sigma=2.0)

    tiled = tile_model(build, Tiling(32, 32, (64, 64)))
    assert isinstance(tiled, TiledTrainedModel) and tiled.trained_model is tiled.models[0]
    optimisers = SimpleNetModule(tiled).configure_optimizers()
    assert {id(p) for p in optimisers[1].param_groups[0]["params"]} == {
        id(p) for p in tiled.models[0].discriminator.parameters()
    }
    tiled.train()
    losses = tiled.training_loss(smooth_images(2, 0))  # 2 images: 8 tiles
    losses["loss"].backward()
    assert all(p.grad is not None for p in tiled.models[0].discriminator.parameters())
    assert tiled.eval()(smooth_images(2, 1)).anomaly_map.shape == (2, 1, 64, 64)
    with pytest.raises(ConfigError, match=r"per_position.*fit-once methods"):
        tile_model(build, Tiling(32, 32, (64, 64), per_position=True))


@pytest.mark.slow
def test_small_defects_missed_at_low_resolution_are_found_by_tiles(tmp_path, run_job):
    """Particles 3-6 px across in 256-px images: resized to 64 px they are below a pixel; tiles of 64 px
    at full resolution keep them. Both runs are measured against the 256-px masks."""
    data = ["dataset.category=specks", "dataset.generated_size=256", "dataset.n_train=20",
            "dataset.n_calibration=0",
            "dataset.n_test_good=10", "dataset.n_test_defect=10", "dataset.calibration_fraction=0.2",
            "dataset.num_workers=0", "method=patchcore", "logger=none",
            "trainer.enable_progress_bar=false"]  # fmt: skip
    resized = run_job(tmp_path / "resized", [*data, "dataset.image_size=64"])[1]
    tiled = run_job(tmp_path / "tiled", [*data, "dataset.image_size=[256,256]", "tiling.tile_size=64"])[1]
    test = SyntheticAD(str(tmp_path / "shared-data" / "synthetic"), "specks", n_train=20, n_test_good=10,
                       n_test_defect=10, generated_size=256, image_size=256, num_workers=0)  # fmt: skip
    samples = test.load_samples().test
    results = {}
    for name, run_dir in (("resized", resized), ("tiled", tiled)):
        loaded = load_model(run_dir)
        results[name] = full_resolution_metrics(
            loaded.model, loaded.preprocessing, samples, pixel_threshold=loaded.calibration.pixel_threshold
        )
    # measured: image AUROC 0.61 -> 1.0, pixel AUROC 0.70 -> 0.95, AU-PRO 0.28 -> 0.86, regions found at
    # the calibrated threshold 0.17 -> 0.67 (a threshold from 4 normal images is a cautious one)
    resized, tiled = results["resized"], results["tiled"]
    assert tiled["image_auroc"] > resized["image_auroc"] + 0.2, results
    assert tiled["pixel_auroc"] > resized["pixel_auroc"] + 0.15, results
    assert tiled["pixel_aupro"] > resized["pixel_aupro"] + 0.4, results
    assert tiled["regions_detected_at_threshold"] > resized["regions_detected_at_threshold"] + 0.3, results
