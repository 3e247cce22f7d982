"""anomaly-report: every run of an output root, across sweeps and data sets, on one page.

``anomaly-report outputs/`` reads ``outputs/runs.sqlite`` (appended by every ``anomaly-train`` job) and
writes ``outputs/report/index.html`` (one table across data sets, then per data set its tables beside the
published numbers, plots and runs) and ``outputs/report/<data set>.md`` (the same tables in Markdown).
Each protocol is shown apart: the overview and ``<data set>.md`` hold one model per category on all its
training images; few-shot runs get ``<data set>-few-shot.md`` and a section of their own (k × draws
tables and learning curves). Of several runs of one combination (method and settings, data set,
category, k, seed, draw) the newest counts.
"""

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from anomaly.cli.runtime import report_user_errors
from anomaly.errors import UserError
from anomaly.reports.collect import FEW_SHOT, newest_per_combination, of_protocol, on_all_images, record_rows
from anomaly.reports.database import DATABASE_FILE, read_runs
from anomaly.reports.html import database_report_html
from anomaly.reports.plots import save_learning_curves, save_plots
from anomaly.reports.tables import (
    VALUES_NOTE,
    few_shot_tables,
    heading,
    markdown_table,
    overview_tables,
    summary_markdown,
    summary_tables,
)

log = logging.getLogger(__name__)


def write_report(source: Path, out_dir: Path) -> Path:
    """The page and the Markdown tables of the runs in ``source`` (an output root or its database);
    returns the page's path."""
    database = source / DATABASE_FILE if source.is_dir() else source
    if not database.is_file():
        raise UserError(
            f"No results database at {database}: anomaly-train appends every run to "
            f"<output root>/{DATABASE_FILE} (paths.results_db). Pass that folder or file."
        )
    everything = [row for record, run_dir in read_runs(database) for row in record_rows(record, run_dir)]
    if not everything:
        raise UserError(f"{database} holds no runs yet.")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, sections = [], []
    for dataset in sorted({row["dataset"] for row in everything}):
        # variants per data set: its own settings (e.g. a generated set's size) are not a method variant
        subset, repeats = newest_per_combination([row for row in everything if row["dataset"] == dataset])
        notes = [f"Ignored {len(repeats)} older run(s) of a combination run again."] if repeats else []
        if per_category := on_all_images(subset):
            rows += per_category
            tables = summary_tables(per_category)
            markdown = summary_markdown(per_category, tables, notes, title=f"{dataset}: results")
            (out_dir / f"{dataset}.md").write_text(markdown)
            sections.append(
                (dataset, per_category, tables, save_plots(per_category, out_dir / "plots" / dataset))
            )
        if few_shot := of_protocol(subset, FEW_SHOT):  # beside the same data set's runs on all images
            name = f"{dataset}-few-shot"
            tables = few_shot_tables(subset)
            markdown = summary_markdown(
                few_shot, {}, notes, title=f"{dataset}: few-shot results", few_shot=tables
            )
            (out_dir / f"{name}.md").write_text(markdown)
            sections.append((name, few_shot, tables, save_learning_curves(subset, out_dir / "plots" / name)))
    overview = overview_tables(rows)
    lines = ["# All data sets: mean over categories (one model per category, all its training images)", "",
             f"{VALUES_NOTE} (n/N): categories run of N.", ""]  # fmt: skip
    for metric, table in overview.items():
        lines += [f"## {heading(metric)}", "", *markdown_table(table), ""]
    (out_dir / "overview.md").write_text("\n".join(lines))
    page = out_dir / "index.html"
    page.write_text(database_report_html(overview, sections, database, out_dir))
    return page


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anomaly-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help=f"an output root holding {DATABASE_FILE} (or the file)")
    parser.add_argument("--out", type=Path, help="where to write the report (default: <source>/report)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = args.source if args.source.is_dir() else args.source.parent
    page = report_user_errors(lambda: write_report(args.source, args.out or root / "report"))
    print(f"Report: {page} (Markdown tables beside it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
