"""The metric registry (anomaly/metrics/registry.py) is the one list of metrics: every key the Evaluator
returns is in it, and a metric added to it alone reaches results.csv, the summary tables, plots, report.html,
anomaly-report's overview and the wandb summary, with no other file to edit."""

import csv
from pathlib import Path

import pytest
import torch
import yaml

from anomaly.cli.report import main as main_report
from anomaly.metrics import Evaluator, registry
from anomaly.metrics.registry import METRICS, Metric, reported_metrics
from anomaly.reports import wandb_logging
from anomaly.reports.database import append_run
from anomaly.reports.records import RunRecord
from anomaly.reports.sweep import write_reports
from anomaly.reports.tables import REFERENCES_FILE, format_cell

REGISTERED = {metric.key for metric in METRICS}
ADDED = Metric("image_recall_at_fpr", "recall at 1 % FPR", True, pixel=False, percent=True, reported=True)


def evaluated(exact_pixel_limit: int, with_pixels: bool = True) -> dict[str, float]:
    """Every metric of a small test set (4 good, 4 defective images of 8 x 8 px, two views of 4 parts),
    thresholds given."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    masks = torch.zeros(8, 1, 8, 8, dtype=torch.uint8)
    masks[4:, :, 2:5, 2:5] = 1
    maps = torch.rand(8, 1, 8, 8, generator=generator) * 0.5 + masks * 0.4
    parts = torch.arange(8) // 2
    evaluator = Evaluator(exact_pixel_limit=exact_pixel_limit, histogram_bins=64, part_ids=parts)
    pixels = (maps, masks) if with_pixels else (None, None)
    evaluator.update(maps.amax(dim=(1, 2, 3)), labels, *pixels, indices=torch.arange(8))
    return evaluator.compute(threshold=0.6, pixel_threshold=0.6)


def test_every_key_the_evaluator_returns_is_registered_and_every_registered_key_is_returned():
    exact, binned, image_only = evaluated(10**9), evaluated(0), evaluated(10**9, with_pixels=False)
    assert set(exact) | set(binned) == REGISTERED  # none missing, none stale
    assert set(image_only) == {metric.key for metric in METRICS if not metric.pixel}
    assert len(REGISTERED) == len(METRICS), "a key is registered twice"


def test_the_papers_numbers_are_of_reported_metrics():
    """paper_results.yaml is read by metric key: a key the tables never show would be ignored silently."""
    reported = {metric.key for metric in reported_metrics()}
    for dataset, methods in yaml.safe_load(REFERENCES_FILE.read_text()).items():
        for method, reference in methods.items():
            assert set(reference["metrics"]) <= reported, (dataset, method)


def write_run(folder: Path, category: str, value: float) -> RunRecord:
    metrics = {**{metric.key: 0.9 for metric in reported_metrics()}, ADDED.key: value}
    record = RunRecord("padim", "resnet18", "synthetic", category, 0, "ok", metrics=metrics)
    record.write(folder / category)
    return record


class FakeWandbRun:
    def __init__(self) -> None:
        self.logged: dict = {}

    def log(self, values: dict) -> None:
        self.logged.update(values)

    def finish(self) -> None:
        pass


def test_a_metric_added_to_the_registry_reaches_every_report(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "METRICS", (*METRICS, ADDED))
    sweep = tmp_path / "sweep"
    records = [write_run(sweep, "fabric", 0.625), write_run(sweep, "tile", 0.875)]
    rows, tables, plots = write_reports(sweep)

    assert [float(row[ADDED.key]) for row in csv.DictReader((sweep / "results.csv").open())] == [0.625, 0.875]
    summary = (sweep / "summary.md").read_text()
    assert "## image_recall_at_fpr: recall at 1 % FPR (%) ↑" in summary
    table = summary.split("## image_recall_at_fpr:")[1].split("\n## ")[0]
    assert "| fabric | 62.5 |" in table and "| tile | 87.5 |" in table and "| **mean** | 75.0 |" in table
    assert (sweep / "plots" / f"{ADDED.key}.png").is_file() and sweep / "plots" / f"{ADDED.key}.png" in plots
    page = (sweep / "report.html").read_text()
    assert "recall at 1 % FPR (%) ↑" in page and f"plots/{ADDED.key}.png" in page

    run = FakeWandbRun()
    monkeypatch.setattr("wandb.init", lambda **kwargs: run)
    wandb_logging.log_to_wandb([{**row, "wandb": {"project": "p"}} for row in rows], tables, plots, sweep)
    assert ADDED.key in run.logged["results"].columns and f"summary/{ADDED.key}" in run.logged

    database = tmp_path / "outputs" / "runs.sqlite"
    for record in records:
        append_run(database, record, sweep / record.category)
    assert main_report([str(database.parent)]) == 0
    overview = (database.parent / "report" / "overview.md").read_text()
    assert "## image_recall_at_fpr:" in overview and "| 75.0 |" in overview.split("image_recall_at_fpr")[1]
    assert (database.parent / "report" / "plots" / "synthetic" / f"{ADDED.key}.png").is_file()


@pytest.mark.parametrize(
    ("metric", "values", "cell"),
    [
        (Metric("k", "share", False, pixel=False, percent=True), [0.1234], "12.3"),
        (Metric("k", "seconds", False, pixel=False, percent=False), [1.5, 2.5], "2 ± 0.7071"),
    ],
)
def test_a_metric_is_shown_in_percent_only_if_it_is_a_share(metric, values, cell):
    assert format_cell(values, metric) == cell
