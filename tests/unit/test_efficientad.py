"""EfficientAD: shapes, training, calibration on normal images only, save/reload, teachers, end to end.

Unit tests use random PDN teachers written in the published teacher format (fast, and enough to test the
mechanics); the distillation test and the end-to-end run use a teacher distilled by
``anomaly-distill-teacher`` from the offline EfficientNet-Lite0 over a few generated images.
"""

import csv
import json
import logging
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_file

from anomaly.cli.distill import distill
from anomaly.config import config_dir
from anomaly.data.synthetic import SyntheticAD, generate_dataset
from anomaly.errors import ConfigError, DataError
from anomaly.methods.efficientad.model import (
    AutoEncoder,
    EfficientAD,
    _decoder_sizes,
    patch_description_network,
)
from anomaly.methods.efficientad.module import EfficientADModule
from anomaly.model_io import load_model

SIZE = 64  # test image side: the PDN grid is 8x8 here (56x56 at the paper's 256)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, str]:
    """Random PDN teachers in the published format, two for the small size (to tell them apart)."""
    folder = tmp_path_factory.mktemp("teachers")
    paths = {}
    for name, size, seed in (("small", "small", 0), ("small_other", "small", 1), ("medium", "medium", 0)):
        torch.manual_seed(seed)
        paths[name] = str(folder / f"teacher_{name}.pth")
        torch.save(patch_description_network(384, size).state_dict(), paths[name])
    return paths


def fitted_model(teacher: str, images: torch.Tensor, model_size: str = "small") -> EfficientAD:
    """A model with teacher statistics and map quantiles taken on ``images`` (no training)."""
    model = EfficientAD(teacher_weights=teacher, model_size=model_size)
    model.prepare([images])
    model.eval().finalize([images])
    return model


def map_quantiles(model: EfficientAD, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_a, q_b) of the ST and of the AE maps of ``images``, as finalize() takes them."""
    return tuple(model.map_quantiles(maps) for maps in model.raw_maps(images))


def test_pdn_and_autoencoder_grids_match_the_reference_at_256_px():
    images = torch.zeros(1, 3, 256, 256, device="meta")  # shapes only, no compute
    for size in ("small", "medium"):
        assert patch_description_network(384, size).to("meta")(images).shape == (1, 384, 56, 56)
        assert patch_description_network(384, size, padding=True).to("meta")(images).shape == (1, 384, 64, 64)
    assert AutoEncoder(384).to("meta")(images, (56, 56)).shape == (1, 384, 56, 56)
    assert [h for h, _ in _decoder_sizes(images.shape[-2:])] == [3, 8, 15, 32, 63, 127]


@pytest.mark.parametrize("model_size", ["small", "medium"])
def test_output_shapes_and_losses(teachers, model_size):
    torch.manual_seed(0)
    images = torch.rand(2, 3, SIZE, SIZE)
    model = fitted_model(teachers[model_size], images, model_size)
    map_st, map_ae = model.raw_maps(images)
    assert map_st.shape == map_ae.shape == (2, 1, 8, 8)
    output = model(images)
    assert output.anomaly_map.shape == (2, 1, SIZE, SIZE) and output.image_score.shape == (2,)
    assert torch.equal(output.image_score, output.anomaly_map.amax(dim=(1, 2, 3)))
    assert torch.equal(model(images).anomaly_map, output.anomaly_map)  # deterministic in eval

    model.train()
    losses = model.training_loss(images, penalty_images=torch.rand(2, 3, SIZE, SIZE))
    assert set(losses) == {"loss", "loss_st", "loss_ae", "loss_stae", "loss_penalty"}
    parts = sum(value for key, value in losses.items() if key != "loss")
    assert torch.allclose(losses["loss"], parts)
    losses["loss"].backward()
    assert model.teacher.get_submodule("0").weight.grad is None  # the teacher stays frozen
    assert model.student[0].weight.grad is not None and model.autoencoder.head[0].weight.grad is not None


def test_loss_decreases_on_a_tiny_case(teachers):
    torch.manual_seed(0)
    images = torch.rand(1, 3, SIZE, SIZE)
    model = EfficientAD(teacher_weights=teachers["small"])
    model.prepare([images])
    parameters = [*model.student.parameters(), *model.autoencoder.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=1e-3)
    history = []
    for _ in range(15):
        losses = model.training_loss(images)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        history.append({key: value.item() for key, value in losses.items()})
    assert set(history[0]) == {"loss", "loss_st", "loss_ae", "loss_stae"}  # no penalty images, no penalty
    # the hard student-teacher loss has no augmentation: it must fall steadily; the total (with the
    # colour-jittered autoencoder terms) on average
    assert history[-1]["loss_st"] < 0.9 * history[0]["loss_st"], history
    assert sum(h["loss"] for h in history[-3:]) / 3 < history[0]["loss"], history


@pytest.mark.slow
def test_corrupted_images_score_higher_than_training_images_after_short_training(
    teachers, smooth_images, with_square, defect_square
):
    torch.manual_seed(0)
    normal = smooth_images(8, seed=0)
    defective = with_square(normal)  # a bright square: a region the student never saw
    model = EfficientAD(teacher_weights=teachers["small"])
    model.prepare([normal])
    optimizer = torch.optim.Adam([*model.student.parameters(), *model.autoencoder.parameters()], lr=1e-3)
    for step in range(60):
        loss = model.training_loss(normal[step % 8 :: 8])["loss"]  # batch 1, as the paper
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().finalize([smooth_images(4, seed=1)])  # held-out normal images
    normal_scores, defect_scores = model(normal).image_score, model(defective).image_score
    assert defect_scores.min() > normal_scores.max(), (normal_scores, defect_scores)
    maps = model(defective).anomaly_map
    inside = maps[:, :, defect_square[0], defect_square[1]].mean()
    assert inside > maps[:, :, :, :16].mean()  # the map points at the square


def small_data(tmp_path, **options) -> SyntheticAD:
    data = SyntheticAD(
        root=str(tmp_path / "data"), category="tile", n_train=10, n_test_good=3, n_test_defect=3,
        generated_size=SIZE, image_size=SIZE, crop_size=None, batch_size=2, num_workers=0, **options,
    )  # fmt: skip
    data.setup()
    return data


def fit(model: EfficientAD, data: SyntheticAD, max_steps: int, **module_options) -> pl.Trainer:
    # as configs/method/efficientad.yaml + configs/trainer/default.yaml
    trainer = pl.Trainer(
        max_steps=max_steps, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(EfficientADModule(model, max_steps=max_steps, **module_options), datamodule=data)
    return trainer


def test_map_quantiles_come_from_normal_images_disjoint_from_the_thresholds(teachers, tmp_path, monkeypatch):
    data = small_data(tmp_path, calibration_fraction=0.4, normalization_share=EfficientAD.normalization_share)
    normalization = {s.image_path for s in data.normalization_samples}
    calibration = {s.image_path for s in data.calibration_samples}
    assert len(normalization) == len(calibration) == 2  # 4 held-out images of 10, half each
    assert not normalization & calibration and not (normalization | calibration) & {
        s.image_path for s in data.train_samples
    }

    def leak(*_):
        raise AssertionError("the test set was read while fitting")

    monkeypatch.setattr(data, "test_dataloader", leak)
    model = EfficientAD(teacher_weights=teachers["small"])
    penalty_images = tmp_path / "data" / "tile" / "train"  # stands in for ImageNet
    trainer = fit(model, data, max_steps=2, penalty_image_dir=str(penalty_images))
    assert "train/loss_penalty" in trainer.callback_metrics

    model.eval()  # the quantiles are taken in eval mode (no dropout), as scoring runs
    own_images = torch.cat([batch["image"] for batch in data.normalization_dataloader()])
    expected_st, expected_ae = map_quantiles(model, own_images)  # one batch: equal up to float rounding
    assert torch.allclose(model.quantiles_st, expected_st, rtol=1e-4, atol=0)
    assert torch.allclose(model.quantiles_ae, expected_ae, rtol=1e-4, atol=0)
    # negative control: the threshold's images give other quantiles (they were not used)
    threshold_images = torch.cat([batch["image"] for batch in data.calibration_dataloader()])
    other_st, _ = map_quantiles(model, threshold_images)
    assert not torch.allclose(other_st, expected_st, rtol=1e-3, atol=0)


def test_empty_validation_split_fails_with_the_fix(teachers, tmp_path):
    with pytest.raises(DataError, match="calibration_fraction"):
        fit(EfficientAD(teacher_weights=teachers["small"]), small_data(tmp_path, calibration_fraction=0.0), 1)


def test_state_dict_round_trip_gives_identical_scores(teachers, tmp_path):
    torch.manual_seed(0)
    images = torch.rand(3, 3, SIZE, SIZE)
    model = fitted_model(teachers["small"], images)
    model.train()
    optimizer = torch.optim.Adam(model.student.parameters(), lr=1e-3)
    model.training_loss(images)["loss"].backward()
    optimizer.step()
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))

    # built around another teacher: the file must carry teacher, statistics and quantiles
    reloaded = EfficientAD(teacher_weights=teachers["small_other"])
    reloaded.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    reloaded.eval()
    assert torch.equal(reloaded(images).image_score, model(images).image_score)
    assert torch.equal(reloaded(images).anomaly_map, model(images).anomaly_map)


def test_missing_or_wrong_teacher_fails_naming_the_ways_to_get_one(teachers, tmp_path):
    with pytest.raises(ConfigError, match="teacher_weights") as error:
        EfficientADModule(EfficientAD())  # what anomaly-train builds: fails before reading any data
    assert "anomaly-distill-teacher" in str(error.value)
    with pytest.raises(ConfigError, match="never trained from a random one"):  # pure torch use cannot either
        EfficientAD().prepare([torch.rand(1, 3, SIZE, SIZE)])
    with pytest.raises(ConfigError, match=r"nowhere\.pth"):
        EfficientAD(teacher_weights=str(tmp_path / "nowhere.pth"))
    with pytest.raises(ConfigError, match=r"teacher_small\.pth.*medium"):
        EfficientAD(teacher_weights=teachers["small"], model_size="medium")
    (tmp_path / "text.pth").write_text("not a state dict")
    with pytest.raises(ConfigError, match=r"text\.pth"):
        EfficientAD(teacher_weights=str(tmp_path / "text.pth"))


def compose_distill(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("distill", overrides=overrides)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory) -> list[str]:
    """Distils a tiny teacher (2 steps at 64 px) over generated normal images; returns its overrides."""
    folder = tmp_path_factory.mktemp("distill")
    generate_dataset(folder / "data", ["tile"], n_train=6, n_test_good=1, n_test_defect=1, image_size=SIZE)
    overrides = [
        f"image_dir={folder / 'data' / 'tile' / 'train'}", f"output={folder / 'teacher.pth'}",
        f"image_size={SIZE}", "batch_size=2", "statistics_images=6", "num_workers=0", "checkpoint_every=1",
    ]  # fmt: skip
    distill(compose_distill([*overrides, "steps=2"]))
    return overrides


@pytest.mark.slow
def test_distill_resumes_and_writes_a_loadable_teacher(distilled, caplog):
    cfg = compose_distill([*distilled, "steps=3"])
    assert torch.load(cfg.checkpoint, weights_only=True)["step"] == 2
    with caplog.at_level(logging.INFO, logger="anomaly.methods.efficientad.distill"):
        output = distill(cfg)
    assert "at step 2" in caplog.text  # resumed, not restarted
    checkpoint = torch.load(cfg.checkpoint, weights_only=True)
    assert checkpoint["step"] == 3
    model = EfficientAD(teacher_weights=str(output))
    for key, value in checkpoint["pdn"].items():
        assert torch.equal(model.teacher.state_dict()[key], value)
    with pytest.raises(ValueError, match="resume=false"):
        distill(compose_distill([*distilled, "steps=4", "model_size=medium"]))


@pytest.mark.slow
def test_end_to_end_detects_generated_defects_and_reloads(distilled, tmp_path, run_training, score_test_set):
    teacher = next(o for o in distilled if o.startswith("output=")).removeprefix("output=")
    metrics, output_dir = run_training(
        tmp_path,
        [
            "method=efficientad", "logger=csv", f"method.model.teacher_weights={teacher}",
            "method.max_steps=40", "dataset.calibration_fraction=0.25", f"dataset.image_size={SIZE}",
            "dataset.batch_size=1",
        ],
    )  # fmt: skip
    assert metrics["image_auroc"] > 0.7, metrics
    # 4 of the 16 training images held out: 2 gave the map quantiles, the other 2 the threshold
    assert json.loads((output_dir / "run.json").read_text())["calibration"]["num_images"] == 2
    rows = list(csv.DictReader((output_dir / "csv" / "version_0" / "metrics.csv").open()))
    losses = [float(row["train/loss"]) for row in rows if row.get("train/loss")]
    assert len(losses) == 4  # every 10 steps (trainer.log_every_n_steps)

    # the saved file holds the teacher: the model reloads where the teacher file is not
    hidden_teacher = Path(teacher).rename(Path(teacher).with_suffix(".hidden"))
    try:
        model = load_model(output_dir / "model.safetensors").model
    finally:
        hidden_teacher.rename(teacher)
    data = SyntheticAD(
        root=str(tmp_path.parent / "shared-data" / "synthetic"), category="fabric", n_train=16, n_test_good=8,
        n_test_defect=12, generated_size=128, image_size=SIZE, crop_size=None, batch_size=8, num_workers=0,
    )  # fmt: skip
    data.setup()
    assert score_test_set(model, data)["image_auroc"] == pytest.approx(metrics["image_auroc"], abs=1e-6)


def test_decoder_dropout_is_stochastic_in_training_and_off_in_eval():
    torch.manual_seed(0)
    autoencoder = AutoEncoder(32)
    images = torch.rand(1, 3, SIZE, SIZE)
    assert sum(isinstance(m, torch.nn.Dropout) and m.p == 0.2 for m in autoencoder.modules()) == 1
    autoencoder.train()
    assert not torch.equal(autoencoder(images, (8, 8)), autoencoder(images, (8, 8)))
    autoencoder.eval()
    assert torch.equal(autoencoder(images, (8, 8)), autoencoder(images, (8, 8)))


def test_decoder_dropout_zero_is_deterministic_in_training():
    autoencoder = AutoEncoder(32, dropout=0.0).train()
    images = torch.rand(1, 3, SIZE, SIZE)
    assert torch.equal(autoencoder(images, (8, 8)), autoencoder(images, (8, 8)))
