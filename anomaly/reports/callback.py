"""The Hydra callback (configs/hydra/default.yaml) that writes a sweep's reports when the sweep ends."""

from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class CollectResults(Callback):
    """At the end of a multirun, in the launching process: reports, then a non-zero exit if a job failed.

    The report code is imported here, when a sweep ends, so that Hydra, which builds its callbacks before
    any job, never hides an import error behind its own "Error locating target".
    """

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from anomaly.reports.sweep import finish_sweep, search_notes

        sweep_dir = Path(config.hydra.sweep.dir)
        failed = finish_sweep(sweep_dir, search_notes(config, sweep_dir))
        if failed:
            raise SystemExit(f"{len(failed)} run(s) failed: see {sweep_dir / 'summary.md'}")
