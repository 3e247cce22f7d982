"""Every config group composes, and the objects it names can be built (without touching data or weights)."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")
GROUPS = {
    group: sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))
    for group in ("dataset", "backbone", "method", "logger")
}


def compose_train(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = "/tmp/anomaly-test-output"
        cfg.paths.root_dir = "/tmp"
    return cfg


@pytest.mark.parametrize("method", GROUPS["method"])
@pytest.mark.parametrize("backbone", GROUPS["backbone"])
def test_method_backbone_combinations_compose(method, backbone):
    cfg = compose_train([f"method={method}", f"backbone={backbone}"])
    assert cfg.method.name == method
    assert cfg.backbone.name.startswith(backbone.split("_")[0])
    assert cfg.trainer.max_epochs == cfg.method.max_epochs
    if method == "patchcore":  # PatchCore uses the mid-level layers only
        assert len(cfg.backbone.layers) == 2


@pytest.mark.parametrize("dataset", GROUPS["dataset"])
@pytest.mark.parametrize("logger", GROUPS["logger"])
def test_dataset_and_logger_configs_compose(dataset, logger):
    cfg = compose_train([f"dataset={dataset}", f"logger={logger}", "dataset.root=/data/x"])
    assert cfg.dataset.seed == cfg.seed


def test_seed_zero_is_kept():
    cfg = compose_train(["seed=0", "method=padim"])
    assert cfg.method.model.seed == 0 and cfg.dataset.seed == 0
