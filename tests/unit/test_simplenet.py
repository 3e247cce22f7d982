"""SimpleNet: shapes, determinism, frozen backbone, optimisers, training, save/reload, end to end.

Unit tests use the tiny random backbone from conftest; the end-to-end test runs anomaly-train with the
offline pretrained EfficientNet-Lite0 on small generated data.
"""

import csv
from collections.abc import Iterator

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from anomaly.backbones.patch_features import PatchFeatures
from anomaly.data.synthetic import SyntheticAD
from anomaly.methods.simplenet.model import SimpleNet
from anomaly.methods.simplenet.module import SimpleNetModule
from anomaly.model_io import load_model

FAST = {"adaptor_lr": 1e-3, "discriminator_lr": 2e-3}  # 10x the official rates: a few steps suffice


def make_model(backbone: torch.nn.Module, seed: int = 0) -> SimpleNet:
    """The tiny backbone's features spread ~0.008 per dimension (Lite0's: ~2), so the noise is scaled
    down to that spread, as the official 0.015 is to WideResNet50's features."""
    torch.manual_seed(seed)
    features = PatchFeatures(backbone, pre_embed_dim=64, target_embed_dim=64)
    return SimpleNet(features, discriminator_hidden=64, noise_std=0.008, blur_sigma=2.0)


def ids(optimiser: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimiser.param_groups for p in group["params"]}


def train(model: SimpleNet, images: Tensor, steps: int, **optimiser_values: float) -> list[float]:
    """Steps the module's own optimisers as TrainedModule does; returns the per-step losses."""
    optimisers = SimpleNetModule(model, **optimiser_values).configure_optimizers()
    model.train()
    losses = []
    for step in range(steps):
        loss = model.training_loss(images[(step % 2) :: 2])["loss"]
        for optimiser in optimisers:
            optimiser.zero_grad()
        loss.backward()
        for optimiser in optimisers:
            optimiser.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """On a shared, loaded CPU two torch threads keep waiting on each other (5-10x slower measured)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def trained(tiny_backbone, smooth_images) -> SimpleNet:
    """A tiny SimpleNet trained on smooth normal images (fast learning rates: few steps; at 150 steps on one
    thread the loss was still 0.012 and the square not yet separated, 0.0014 at 200)."""
    model = make_model(tiny_backbone())
    train(model, smooth_images(16, seed=0), steps=200, **FAST)
    return model.eval()


def test_shapes_loss_keys_and_deterministic_eval(tiny_backbone, smooth_images):
    model = make_model(tiny_backbone())
    images = smooth_images(2, seed=1)
    losses = model.train().training_loss(images)
    assert set(losses) == {"loss", "loss_true", "loss_fake", "p_true", "p_fake"}
    assert all(value.dim() == 0 and torch.isfinite(value) for value in losses.values())
    assert torch.allclose(losses["loss"], losses["loss_true"] + losses["loss_fake"])
    model.eval()
    first, second = model(images), model(images)
    assert first.anomaly_map.shape == (2, 1, *images.shape[-2:])
    assert first.image_score.shape == (2,)
    assert torch.equal(first.anomaly_map, second.anomaly_map)
    assert torch.equal(first.image_score, second.image_score)


def test_backbone_stays_frozen_and_optimisers_split_the_trained_parameters(tiny_backbone, smooth_images):
    backbone = tiny_backbone()
    model = make_model(backbone)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    adaptor, discriminator = SimpleNetModule(
        model, adaptor_lr=1e-4, discriminator_lr=2e-4, discriminator_weight_decay=1e-5
    ).configure_optimizers()
    assert isinstance(adaptor, torch.optim.AdamW) and type(discriminator) is torch.optim.Adam
    assert adaptor.defaults["lr"] == 1e-4 and discriminator.defaults["lr"] == 2e-4
    assert adaptor.defaults["weight_decay"] == 0.01 and discriminator.defaults["weight_decay"] == 1e-5
    assert ids(adaptor) == {id(p) for p in model.adaptor.parameters()}
    assert ids(discriminator) == {id(p) for p in model.discriminator.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == ids(adaptor) | ids(discriminator)

    backbone.requires_grad_(True)  # even so, no gradient may reach it: features come under no_grad
    train(model, smooth_images(4, seed=0), steps=2)
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
    assert all(p.grad is None for p in backbone.parameters())


def test_loss_decreases(tiny_backbone, smooth_images):
    losses = train(make_model(tiny_backbone()), smooth_images(8, seed=0), steps=30, **FAST)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_corrupted_images_score_higher_than_training_images(
    trained, smooth_images, with_square, defect_square
):
    normal = smooth_images(16, seed=0)
    normal_scores = trained(normal).image_score
    defect_scores = trained(with_square(normal)).image_score
    assert defect_scores.min() > normal_scores.max(), (normal_scores, defect_scores)
    maps = trained(with_square(normal)).anomaly_map
    inside = maps[:, :, defect_square[0], defect_square[1]].mean()
    outside = maps[:, :, :, :16].mean()  # the columns left of the square
    assert inside > outside


def test_save_and_reload_gives_identical_scores(trained, tiny_backbone, smooth_images, with_square, tmp_path):
    state = {k: v.contiguous() for k, v in trained.state_dict().items() if ".backbone." not in k}
    assert "discriminator.1.running_mean" in state and int(state["discriminator.1.num_batches_tracked"]) > 0
    save_file(state, str(tmp_path / "model.safetensors"))

    reloaded = make_model(tiny_backbone(), seed=123)  # a different init, overwritten by the file
    result = reloaded.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=False)
    assert not result.unexpected_keys
    assert all(".backbone." in k for k in result.missing_keys)
    images = with_square(smooth_images(4, seed=5))
    expected, actual = trained(images), reloaded.eval()(images)
    assert torch.equal(expected.anomaly_map, actual.anomaly_map)
    assert torch.equal(expected.image_score, actual.image_score)


@pytest.mark.slow
def test_end_to_end_detects_generated_defects_logs_losses_and_reloads(tmp_path, run_training, score_test_set):
    """Batch 4 and 30 epochs: SimpleNet needs optimiser steps (here 120), unlike the fit-once methods."""
    epochs = 30
    metrics, output_dir = run_training(
        tmp_path,
        [
            "method=simplenet",
            "logger=csv",
            f"method.max_epochs={epochs}",
            "dataset.batch_size=4",
            "trainer.log_every_n_steps=1",
        ],
    )
    assert metrics["image_auroc"] > 0.75, metrics  # observed 0.90 (seed 0)
    assert metrics["pixel_auroc"] > 0.65, metrics  # observed 0.81

    data = SyntheticAD(
        root=str(tmp_path.parent / "shared-data" / "synthetic"), category="fabric", n_train=16, n_test_good=8,
        n_test_defect=12, generated_size=128, image_size=128, crop_size=None, batch_size=4, num_workers=0,
        calibration_fraction=0.1, seed=0,
    )  # fmt: skip
    data.setup()
    logged = list(csv.DictReader((output_dir / "csv" / "version_0" / "metrics.csv").open()))
    losses = [float(row["train/loss"]) for row in logged if row.get("train/loss")]
    assert len(losses) == epochs * len(data.train_dataloader()), logged  # one row per optimisation step

    model = load_model(output_dir / "model.safetensors").model
    reloaded = score_test_set(model, data)
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        assert reloaded[key] == pytest.approx(metrics[key], abs=1e-6)
