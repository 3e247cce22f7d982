"""The reports of a sweep (results.csv, summary.md, plots/, report.html, a wandb summary), written at its end.

:class:`anomaly.reports.callback.CollectResults` calls :func:`finish_sweep` at the end of every sweep,
whatever the launcher (basic, joblib, submitit): each job leaves its ``run.json``, and the launching
process reads them all. A failed job is listed with its error
and makes the command exit non-zero after the reports are written. ``python -m anomaly.reports.sweep
SWEEP_DIR`` writes the same reports again (e.g. after a cluster sweep whose launching process was gone).
"""

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml
from omegaconf import DictConfig

from anomaly.metrics.registry import Metric
from anomaly.reports.collect import collect_runs, on_all_images
from anomaly.reports.html import report_html
from anomaly.reports.plots import save_learning_curves, save_plots
from anomaly.reports.tables import Table, few_shot_tables, summary_markdown, summary_tables, write_results_csv
from anomaly.reports.wandb_logging import log_to_wandb

log = logging.getLogger(__name__)


def write_reports(
    sweep_dir: Path, notes: Sequence[str] = ()
) -> tuple[list[dict], dict[Metric, Table], list[Path]]:
    """results.csv, summary.md, plots/ and report.html into ``sweep_dir``; returns (rows, tables, plots).
    Models on all training images (one per category, and unified ones beside them) get ``tables``; few-shot
    runs (k × draws) their own."""
    rows, repeats = collect_runs(sweep_dir)
    if repeats:
        notes = [*notes, f"Ignored {len(repeats)} older run(s) of a combination that was run again: "
                 + ", ".join(Path(r["run_dir"]).name for r in repeats)]  # fmt: skip
    write_results_csv(rows, sweep_dir / "results.csv")
    per_category = on_all_images(rows)
    tables = summary_tables(per_category) if per_category else {}
    few_shot = few_shot_tables(rows)
    (sweep_dir / "summary.md").write_text(summary_markdown(rows, tables, notes, few_shot=few_shot))
    plots = save_plots(per_category, sweep_dir / "plots") + save_learning_curves(rows, sweep_dir / "plots")
    (sweep_dir / "report.html").write_text(report_html(rows, tables, notes, plots, sweep_dir, few_shot))
    return rows, tables, plots


def finish_sweep(sweep_dir: Path, notes: Sequence[str] = ()) -> list[dict]:
    """Reports, printed summary and (if the runs used it) wandb; returns the failed rows."""
    rows, tables, plots = write_reports(sweep_dir, notes)
    failed = [r for r in rows if r["status"] != "ok"]
    log.info("Sweep results: %s (%d runs, %d failed)", sweep_dir / "summary.md", len(rows), len(failed))
    print((sweep_dir / "summary.md").read_text(), flush=True)
    try:
        log_to_wandb(rows, tables, plots, sweep_dir)
    except Exception:  # the reports are written; a wandb problem must not hide the sweep's own status
        log.exception("Could not log the summary to wandb; the reports in %s are complete.", sweep_dir)
    return failed


def search_notes(config: DictConfig, sweep_dir: Path) -> list[str]:
    """For an Optuna sweep: its best trial, and a loud note when it tuned on MVTec AD test images."""
    if "optuna" not in str(config.hydra.sweeper.get("_target_", "")).lower():
        return []
    notes = []
    best = sweep_dir / "optimization_results.yaml"
    if best.is_file():
        result = yaml.safe_load(best.read_text())
        notes.append(f"Optuna best {config.get('optimized_metric')}: {result.get('best_value')} with "
                     f"{result.get('best_params')} (optimization_results.yaml).")  # fmt: skip
    if config.hydra.runtime.choices.get("dataset") == "mvtec":
        notes.append(
            "WARNING: these hyper-parameters were chosen on MVTec AD test images, so the numbers above are "
            "optimistic and must not be reported as test results. Tune on generated data (the default of "
            "configs/hparams_search/) or on categories you do not report."
        )
    return notes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write results.csv, summary.md, plots/ and report.html of a sweep."
    )
    parser.add_argument("sweep_dir", type=Path, help="the multirun's folder (hydra.sweep.dir)")
    args = parser.parse_args(argv)
    return 1 if finish_sweep(args.sweep_dir) else 0


if __name__ == "__main__":
    sys.exit(main())
