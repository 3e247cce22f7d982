"""wandb: the per-run logger, and a sweep's summary as one wandb run in the group its runs share."""

from pathlib import Path

from pytorch_lightning import loggers

from anomaly.errors import require
from anomaly.metrics.registry import Metric
from anomaly.reports.collect import columns
from anomaly.reports.tables import Table


class WandbLogger(loggers.WandbLogger):
    """Lightning's WandbLogger without the ``anonymous=None`` it always passes to ``wandb.init``: wandb
    has deprecated that setting and warns whenever it is passed at all, even as None."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        getattr(self, "_wandb_init", {}).pop("anonymous", None)


def log_to_wandb(rows: list[dict], tables: dict[Metric, Table], plots: list[Path], sweep_dir: Path) -> None:
    """One wandb run per sweep, in the group its runs share (the sweep folder's name, see
    configs/logger/wandb.yaml), holding results.csv and the summary tables as ``wandb.Table``s (one per
    reported metric, ``summary/<key>``) and the plots. Only when the sweep's runs used the wandb logger, and
    offline unless they were all online; quiet, as the runs (the sweep prints its summary.md itself)."""
    settings = [row["wandb"] for row in rows if row.get("wandb")]
    if not settings:
        return
    wandb = require("wandb", "wandb", "Logging a sweep's summary to wandb")

    run = wandb.init(
        project=settings[0].get("project", "anomaly"),
        group=sweep_dir.name,
        job_type="summary",
        name=f"{sweep_dir.name}-summary",
        dir=str(sweep_dir),
        mode="offline" if any(s.get("offline", True) for s in settings) else "online",
        config={"sweep_dir": str(sweep_dir)},
        settings={"quiet": True},
    )
    names = columns()
    results = wandb.Table(columns=list(names), data=[[row.get(c) for c in names] for row in rows])
    summaries = {
        f"summary/{metric.key}": wandb.Table(columns=header, data=body)
        for metric, (header, body) in tables.items()
    }
    run.log({"results": results, **summaries, **{f"plots/{p.stem}": wandb.Image(str(p)) for p in plots}})
    run.finish()
