"""``anomaly-train``: one run of :func:`anomaly.run` per composed config (a sweep's jobs with ``-m``).

Config in, library call, a summary printed; returns the metric named by ``optimized_metric`` so that
Hydra sweepers can optimise it. Everything a run does is in :mod:`anomaly.experiment`.
"""

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from anomaly import distributed
from anomaly.cli.runtime import prepare_process, report_user_errors
from anomaly.config import CONFIG_PATH
from anomaly.errors import describe_user_error
from anomaly.experiment import run
from anomaly.run_dir import RunDirTaken

log = logging.getLogger(__name__)


def run_job(cfg: DictConfig) -> float | None:
    """One job: a failure is recorded in its run dir; inside a sweep the sweep goes on (its report lists
    the failure and the command exits non-zero at the end). A run dir that is another run's stops a sweep
    too: nothing of the refused job is recorded, so its report would show that other run as this one."""
    prepare_process(cfg.reuse_freed_memory, cfg.get("num_threads"))
    try:
        result = run(cfg)
    except Exception as error:
        if HydraConfig.get().mode != RunMode.MULTIRUN or isinstance(error, RunDirTaken):
            raise
        if (message := describe_user_error(error)) is None:
            log.exception("Run failed: %s", cfg.paths.output_dir)
        else:
            log.error("Run failed: %s: %s", cfg.paths.output_dir, message)
        return None
    if distributed.is_launching_process():  # the further ranks of a distributed run say nothing
        print(result.describe(), flush=True)
    return result.metrics.get(cfg.get("optimized_metric"))


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    return report_user_errors(lambda: run_job(cfg))


if __name__ == "__main__":
    main()
