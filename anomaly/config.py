"""The shipped configs: where they are, the resolvers they use, and composing one run's config in Python.

``anomaly-train`` composes through ``@hydra.main``; :func:`compose` gives a notebook or a script the same
config from the same overrides, for :func:`anomaly.run`.
"""

import importlib.resources
import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from anomaly.data.datamodule import ALL_CATEGORIES, category_name

CONFIG_PATH = "pkg://anomaly.configs"  # the configs/ folder, shipped in the package (setup.py)


def config_dir() -> Path:
    """The folder of the shipped configs (the repo's configs/ in an editable install)."""
    return Path(str(importlib.resources.files("anomaly.configs")))


def compose(overrides: Sequence[str] = (), output_dir: str | Path | None = None) -> DictConfig:
    """The config ``anomaly-train <overrides>`` runs, for :func:`anomaly.run`.

    ``output_dir``: the run's folder (default: a new one under ``outputs/runs/``, as the command makes).
    Relative paths are relative to the working directory, as for the command. Sets Hydra's global
    config, as a command does, so that the configs' ``${hydra:...}`` values resolve; sweeps (``-m``)
    are the command's.
    """
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # (the run dir's name reads the choices from it)
    with read_write(cfg.hydra), open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(Path(output_dir or cfg.hydra.run.dir).absolute())
        cfg.hydra.runtime.cwd = os.getcwd()
    HydraConfig.instance().set_config(cfg)
    with read_write(cfg), open_dict(cfg):
        cfg.paths.output_dir = cfg.hydra.runtime.output_dir
        del cfg.hydra  # as in a command's job config
    return cfg


def sweep_id(default: str) -> str:
    """``${sweep_id:default}``: the sweep folder's name in a multirun (the wandb group that lines a sweep's
    runs up, see configs/logger/wandb.yaml), else ``default``."""
    hydra_config = HydraConfig.get()
    return Path(hydra_config.sweep.dir).name if hydra_config.mode == RunMode.MULTIRUN else default


def data_name(cfg: DictConfig) -> str:
    """What a run's data is called in folder names, wandb and result tables: the category (several joined by
    ``+``, or ``all``), else the data folder's name, else the data set config's (``${data_name:}`` in the
    configs)."""
    dataset = cfg.get("dataset") or {}
    if dataset.get("category"):
        category = dataset.category
        return category_name(category if isinstance(category, str) else [str(c) for c in category])
    if "root" in dataset and not OmegaConf.is_missing(dataset, "root") and dataset.root:
        return Path(str(dataset.root)).name
    return HydraConfig.get().runtime.choices.get("dataset", "data") if HydraConfig.initialized() else "data"


def protocol(cfg: DictConfig) -> str:
    """The evaluation protocol a run follows (``RunRecord.protocol``): ``few-shot`` when it fits on k
    images (``dataset.shots``), ``unified`` when one model fits several categories (``dataset.category`` a
    list, or ``all``), else ``per-category``."""
    dataset = cfg.get("dataset") or {}
    if dataset.get("shots") is not None:
        return "few-shot"
    category = dataset.get("category")
    listed = isinstance(category, Sequence) and not isinstance(category, str)
    return "unified" if listed or category == ALL_CATEGORIES else "per-category"


def run_stamp() -> str:
    """``${run_stamp:}``: the start time to the microsecond and the process id, the default run and sweep
    folder names: sorted by time, and never the same folder for two runs started in the same second."""
    return f"{datetime.now():%Y-%m-%d_%H-%M-%S-%f}_{os.getpid()}"


def register_resolvers() -> None:
    """The config resolvers the shipped configs use."""
    OmegaConf.register_new_resolver("sweep_id", sweep_id, replace=True)
    OmegaConf.register_new_resolver("data_name", lambda *, _root_: data_name(_root_), replace=True)
    # cached: the run dir and the sweep dir are resolved more than once, and must stay one folder
    OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True, replace=True)


register_resolvers()  # importing anomaly makes the shipped configs resolvable (compose, the commands, tests)
