"""``anomaly-check-data``: only the data check of ``anomaly-train``, with the same config and overrides.

Lists every file of every split, checks each one (headers, checksums, masks: see
:mod:`anomaly.data.check`) and prints the counts and every problem, grouped with its fix. Exits 1 when
there is a problem, so it can gate a training job.
"""

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from anomaly.cli.runtime import prepare_process, report_user_errors
from anomaly.config import CONFIG_PATH
from anomaly.data.datamodule import AnomalyDataModule


def check_data(cfg: DictConfig) -> AnomalyDataModule:
    """Builds the configured data set and checks it; raises DataError naming every bad file."""
    datamodule: AnomalyDataModule = instantiate(cfg.dataset, on_bad_file="error")
    datamodule.setup()
    print(f"\n{datamodule.summary()}\nEvery file is usable.\n", flush=True)
    return datamodule


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> None:
    prepare_process(cfg.reuse_freed_memory, cfg.get("num_threads"))
    report_user_errors(lambda: check_data(cfg))


if __name__ == "__main__":
    main()
