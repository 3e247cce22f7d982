"""Every config group option composes and the objects it names are built (no data read, no weights
downloaded: random-init backbones), and every top-level config composes."""

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from anomaly.backbones import FeatureExtractor
from anomaly.config import config_dir, protocol
from anomaly.data.datamodule import AnomalyDataModule
from anomaly.data.synthetic import BENCHMARK_CATEGORIES as SYNTHETIC_BENCHMARK
from anomaly.data.synthetic import CATEGORIES as SYNTHETIC_CATEGORIES
from anomaly.errors import ConfigError
from anomaly.methods import METHODS
from anomaly.methods.base import FitOnceModel
from anomaly.methods.lightning import AnomalyModule
from anomaly.reports.tables import BENCHMARK_CATEGORIES

CONFIGS = config_dir()
GROUPS = {
    group: sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))
    for group in (
        "dataset",
        "backbone",
        "method",
        "logger",
        "trainer",
        "experiment",
        "hparams_search",
        "paper",
    )
}
RANDOM_BACKBONE = ["backbone.weights=null"]  # built without weights: nothing to download or read


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = "/tmp/anomaly-test-output"
        cfg.paths.root_dir = "/tmp"
    return cfg


def test_every_method_is_in_the_registry_under_its_config_name():
    assert sorted(METHODS) == GROUPS["method"]
    for method in GROUPS["method"]:
        assert compose_train([f"method={method}"]).method.name == method


@pytest.mark.filterwarnings("ignore:backbone .* is randomly initialised")
@pytest.mark.parametrize("method", GROUPS["method"])
def test_every_method_builds_its_model_and_module(method):
    cfg = compose_train([f"method={method}", *RANDOM_BACKBONE])
    model = instantiate(cfg.method.model)
    assert isinstance(model, METHODS[method])
    if method == "efficientad":  # built without a teacher file: the module refuses, naming the fix
        with pytest.raises(InstantiationException) as error:
            instantiate(cfg.method.module, model=model)
        assert isinstance(error.value.__cause__, ConfigError)
        assert "anomaly-distill-teacher" in str(error.value)
    else:
        assert isinstance(instantiate(cfg.method.module, model=model), AnomalyModule)


@pytest.mark.filterwarnings("ignore:backbone .* is randomly initialised")
@pytest.mark.parametrize("backbone", GROUPS["backbone"])
def test_every_backbone_builds_with_its_method_layers(backbone):
    for method in ("padim", "patchcore"):
        cfg = compose_train([f"method={method}", f"backbone={backbone}", *RANDOM_BACKBONE])
        if method == "patchcore":  # PatchCore uses the mid-level pair (configs/method_backbone)
            assert len(cfg.backbone.layers) == 2
    extractor = instantiate(cfg.backbone)
    assert isinstance(extractor, FeatureExtractor) and extractor.strides == [8, 16]


@pytest.mark.parametrize("method", GROUPS["method"])
@pytest.mark.parametrize("backbone", GROUPS["backbone"])
def test_method_backbone_combinations_compose(method, backbone):
    cfg = compose_train([f"method={method}", f"backbone={backbone}"])
    assert cfg.method.name == method and cfg.backbone.name == backbone
    assert cfg.trainer.max_epochs == cfg.method.max_epochs and cfg.trainer.max_steps == cfg.method.max_steps
    OmegaConf.to_container(cfg.method, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("dataset", GROUPS["dataset"])
def test_every_dataset_builds_without_reading_data(dataset):
    cfg = compose_train([f"dataset={dataset}", "dataset.root=/nowhere"])
    data = instantiate(cfg.dataset)
    assert isinstance(data, AnomalyDataModule) and data.seed == cfg.seed
    assert data.preprocessing.image_size  # the preprocessing is a value of the data module


@pytest.mark.parametrize("logger", GROUPS["logger"])
def test_every_logger_and_the_trainer_build(logger, tmp_path):
    cfg = compose_train([f"logger={logger}"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    loggers = [instantiate(node) for node in (cfg.get("logger") or {}).values()]
    assert len(loggers) == (0 if logger == "none" else 1)
    trainer = instantiate(cfg.trainer, logger=loggers or False)
    assert isinstance(trainer, pl.Trainer)


@pytest.mark.parametrize("experiment", GROUPS["experiment"])
def test_every_experiment_composes_and_builds_its_dataset(experiment):
    """A benchmark sweeps the categories, a model each; a unified experiment fits one on all of them."""
    cfg = compose_train([f"experiment={experiment}", "dataset.root=/nowhere"])
    if experiment.startswith("unified_"):
        assert protocol(cfg) == "unified" and "dataset.category" not in (cfg.hydra.sweeper.params or {})
    else:
        assert cfg.hydra.sweeper.params["dataset.category"]
    assert isinstance(instantiate(cfg.dataset), AnomalyDataModule)


@pytest.mark.parametrize("name", ["mvtec", "visa", "real_iad", "synthetic"])
def test_a_unified_experiment_fits_one_model_on_its_benchmarks_categories(name):
    """``all`` is the data set's categories, the generated one lists its benchmark's; the runs go into the
    per-category benchmark's folder (under unified/), so that its report shows both protocols."""
    cfg = compose_train([f"experiment=unified_{name}", "dataset.root=/nowhere"])
    data = instantiate(cfg.dataset)
    benchmark = compose_train([f"experiment=benchmark_{name}", "dataset.root=/nowhere"])
    swept = str(benchmark.hydra.sweeper.params["dataset.category"]).split(",")
    assert list(data.categories) == swept and cfg.hydra.runtime.choices.dataset == name
    assert cfg.hydra.sweep.dir == benchmark.hydra.sweep.dir and cfg.hydra.sweep.subdir.startswith("unified/")


@pytest.mark.parametrize("name", sorted(BENCHMARK_CATEGORIES))
def test_each_benchmark_sweeps_exactly_its_data_sets_categories(name):
    cfg = compose_train([f"experiment=benchmark_{name}", "dataset.root=/nowhere"])
    swept = [c.strip("'") for c in str(cfg.hydra.sweeper.params["dataset.category"]).split(",")]
    assert swept == list(BENCHMARK_CATEGORIES[name]) and cfg.hydra.runtime.choices.dataset == name
    assert cfg.dataset.category in BENCHMARK_CATEGORIES[name]


def test_the_generated_benchmark_sweeps_its_listed_generated_categories():
    """Its list is synthetic.BENCHMARK_CATEGORIES (specks is for tiling, not for the tables), of
    categories the generator has."""
    cfg = compose_train(["experiment=benchmark_synthetic"])
    swept = str(cfg.hydra.sweeper.params["dataset.category"]).split(",")
    assert swept == list(SYNTHETIC_BENCHMARK) and set(swept) <= set(SYNTHETIC_CATEGORIES)


@pytest.mark.parametrize("search", GROUPS["hparams_search"])
def test_every_search_composes_with_keys_that_exist(search):
    cfg = compose_train([f"hparams_search={search}"])
    for key in cfg.hydra.sweeper.params:
        assert OmegaConf.select(cfg, key) is not None, key


@pytest.mark.parametrize("name", ["predict", "export", "distill"])
def test_the_other_entry_points_configs_compose(name):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            name, overrides=["model=x", "input=y"] if name == "predict" else ["model=x"][: name == "export"]
        )
    assert cfg


def test_distillation_pools_to_1024_from_a_resnet_and_384_from_lite0():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        resnet = compose("distill", overrides=["backbone=wide_resnet50_2"])
        lite = compose("distill", overrides=["backbone=efficientnet_lite0"])
    assert resnet.features.pre_embed_dim == 1024 and list(resnet.backbone.layers) == ["layer2", "layer3"]
    assert lite.features.pre_embed_dim == 384 and list(lite.backbone.layers) == ["blocks.2", "blocks.4"]


def test_seed_zero_is_kept():
    cfg = compose_train(["seed=0", "method=padim"])
    assert cfg.method.model.seed == 0 and cfg.dataset.seed == 0


@pytest.mark.filterwarnings("ignore:backbone .* is randomly initialised")
@pytest.mark.parametrize("paper", sorted(p.stem for p in (CONFIGS / "paper").glob("*.yaml")))
def test_every_paper_setting_composes_builds_and_scores_a_tiny_input(paper, tmp_path):
    from anomaly.methods.efficientad.model import patch_description_network

    overrides = [f"paper={paper}", "backbone.weights=null"]
    if paper == "efficientad":  # the two files the paper's run needs, stood in for by a random teacher
        torch.save(patch_description_network(384, "small").state_dict(), tmp_path / "teacher.pth")
        (tmp_path / "penalty").mkdir()
        overrides += [f"method.model.teacher_weights={tmp_path / 'teacher.pth'}",
                      f"method.module.penalty_image_dir={tmp_path / 'penalty'}"]  # fmt: skip
    cfg = compose_train(overrides)
    assert cfg.method.name == paper
    model = instantiate(cfg.method.model)
    instantiate(cfg.method.module, model=model)
    # PaDiM's 550-dimensional Gaussians, one per position of its stride-4 grid: 32 px inverts 64 of them
    size = 32 if paper == "padim" else 64
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    if isinstance(model, FitOnceModel):
        model.collect(images)
        model.fit()
    elif paper == "efficientad":
        model.prepare([images])
        model.eval().finalize([images])
    output = model.eval()(images)
    assert output.anomaly_map.shape == (2, 1, size, size) and torch.isfinite(output.image_score).all()


def test_a_paper_setting_composes_with_the_mvtec_benchmark():
    cfg = compose_train(["experiment=benchmark_mvtec", "paper=patchcore", "dataset.root=/data/mvtec_ad"])
    assert cfg.backbone.name == "wide_resnet50_2" and cfg.method.model.features.pre_embed_dim == 1024
    assert cfg.dataset.crop_size == 224 and "bottle" in cfg.hydra.sweeper.params["dataset.category"]
