"""``anomaly-train``: one run of :func:`anomaly.run` per composed config (a sweep's jobs with ``-m``).

Config in, library call, a summary printed; returns the metric named by ``optimized_metric`` so that
Hydra sweepers can optimise it. Everything a run does is in :mod:`anomaly.experiment`.
"""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from anomaly import distributed
from anomaly.cli.runtime import prepare_process, report_user_errors
from anomaly.config import CONFIG_PATH
from anomaly.errors import ConfigError, describe_user_error
from anomaly.experiment import run
from anomaly.launching import check_slurm_layout, external_ranks, watchdog_store
from anomaly.run_dir import RunDirTaken
from anomaly.watchdog import CONNECT_SECONDS, Watchdog

log = logging.getLogger(__name__)


def run_job(cfg: DictConfig, watchdog: Watchdog | None = None) -> float | None:
    """One job: a failure is recorded in its run dir; inside a sweep the sweep goes on (its report lists
    the failure and the command exits non-zero at the end; the other ranks of a distributed job stop). A
    run dir that is another run's stops a sweep too: nothing of the refused job is recorded, so its report
    would show that other run as this one."""
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
        if watchdog is not None:
            watchdog.fail()
        return None
    if watchdog is not None:
        watchdog.finish()
    if distributed.is_launching_process():  # the further ranks of a distributed run say nothing
        print(result.describe(), flush=True)
    return result.metrics.get(cfg.get("optimized_metric"))


def start_watchdog(cfg: DictConfig, run_dir_given: bool) -> Watchdog | None:
    """For ranks that torchrun or SLURM started: their SLURM layout checked, then the watchdog that stops
    every rank when one stops (:mod:`anomaly.watchdog`); None for one process. One run per launch: a second
    run in the process (a sweep's next job) would share the first one's store, so it is refused."""
    check_slurm_layout(cfg.trainer.get("devices"), cfg.trainer.get("num_nodes", 1), run_dir_given)
    if (ranks := external_ranks()) is None or not cfg.watchdog:
        return None
    if _WATCHED_RUNS:
        raise ConfigError(
            "A sweep (-m) of several runs in one launch of several ranks (torchrun, srun) is not supported: "
            "its runs would share one watchdog store. Give each run its own launch "
            "(hydra/launcher=submitit_slurm starts one SLURM job per run), or add watchdog=false."
        )
    try:
        store = watchdog_store(ranks, CONNECT_SECONDS)
    except (RuntimeError, TimeoutError):  # rank 0 failed before it opened the store, and printed why
        print(f"Error: rank {ranks.rank} stops because rank 0 did not open the run's store within "
              f"{CONNECT_SECONDS:.0f} s: see its output", file=sys.stderr, flush=True)  # fmt: skip
        sys.exit(1)
    watchdog = Watchdog(store, ranks.rank, ranks.world_size, hosts_store=ranks.hosts_store)
    watchdog.start()
    _WATCHED_RUNS.append(watchdog)
    return watchdog


_WATCHED_RUNS: list[Watchdog] = []  # the command's own record: the watchdog this process started, if any


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def main(cfg: DictConfig) -> float | None:
    run_dir_given = any(item.startswith("hydra.run.dir=") for item in HydraConfig.get().overrides.hydra)
    watchdog = report_user_errors(lambda: start_watchdog(cfg, run_dir_given))
    return report_user_errors(lambda: run_job(cfg, watchdog), watchdog)


if __name__ == "__main__":
    main()
