"""HTML reports that open from disk, no server: a sweep's report.html and anomaly-report's index.html."""

import html
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from anomaly.metrics.registry import Metric
from anomaly.reports.collect import method_label, one_line
from anomaly.reports.tables import FEW_SHOT_NOTE, VALUES_NOTE, Table, heading, shots_label

STYLE = (
    "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img.heat{height:90px}.note{color:#a60}"
    "img.plot{max-width:100%}"
)


def report_html(
    rows: list[dict],
    tables: dict[Metric, Table],
    notes: Sequence[str],
    plots: list[Path],
    sweep_dir: Path,
    few_shot: dict[Metric, Table] | None = None,
) -> str:
    """A sweep's page: its tables (the few-shot ones after the others), plots and every run with its
    heatmaps."""
    n_failed = sum(r["status"] != "ok" for r in rows)
    body = [
        f"<h1>Benchmark report</h1><p>{html.escape(str(sweep_dir))}: {len(rows)} runs, {n_failed} failed. "
        f"{VALUES_NOTE}</p>"
    ]
    body += [f"<p class='note'>{html.escape(note)}</p>" for note in notes]
    body.append(section_html(tables, [], sweep_dir, level=2))
    if few_shot:
        body.append(f"<h2>Few-shot</h2><p>{html.escape(FEW_SHOT_NOTE)}</p>")
        body.append(section_html(few_shot, [], sweep_dir, level=3, prefix="few-shot "))
    body += [section_html({}, plots, sweep_dir, level=2), runs_html(rows, sweep_dir)]
    return page("anomaly benchmark", body)


def database_report_html(
    overview: dict[Metric, Table],
    sections: Sequence[tuple[str, list[dict], dict[Metric, Table], list[Path]]],
    source: Path,
    page_dir: Path,
) -> str:
    """anomaly-report's page: one table across data sets, then per data set (name, rows, tables, plots)."""
    runs = sum(len(rows) for _, rows, _, _ in sections)
    body = [
        f"<h1>Results across benchmarks</h1><p>{html.escape(str(source))}: {runs} runs on "
        f"{len(sections)} section(s) (a data set and protocol each). {VALUES_NOTE} (n/N): categories run "
        "of N.</p>",
        "<h2 id='overview'>All data sets: mean over categories</h2>",
    ]
    body += [
        f"<h3>{html.escape(heading(metric))}</h3>" + html_table(*table) for metric, table in overview.items()
    ]
    for name, rows, tables, plots in sections:
        anchor = html.escape(name)
        body.append(f"<h2 id='{anchor}'>{anchor}</h2>")
        body += [section_html(tables, plots, page_dir, level=3), runs_html(rows, page_dir)]
    return page("anomaly results", body)


def section_html(
    tables: dict[Metric, Table], plots: list[Path], page_dir: Path, level: int, prefix: str = ""
) -> str:
    parts = [
        f"<h{level}>{html.escape(prefix + heading(metric))}</h{level}>" + html_table(*table)
        for metric, table in tables.items()
    ]
    parts += [
        f'<h{level}>{p.stem}</h{level}><img class="plot" src="{link(p, page_dir)}" alt="{p.stem}">'
        for p in plots
    ]
    return "".join(parts)


def runs_html(rows: list[dict], page_dir: Path) -> str:
    """Every run: method, category, seed, status, three heatmaps and a link to its folder."""
    runs = []
    for row in rows:
        run_dir = Path(row["run_dir"])
        heatmaps = sorted((run_dir / "heatmaps").glob("*.png"))[:3]
        images = "".join(f'<img class="heat" src="{link(h, page_dir)}" alt="{h.stem}">' for h in heatmaps)
        status = row["status"] if row["status"] == "ok" else f"failed: {one_line(row.get('error', ''))}"
        cells = [method_label(row), str(row["category"]), f"{row['seed']}{shots_label(row)}", status]
        folder = f"<a href='{link(run_dir, page_dir)}'>{html.escape(run_dir.name)}</a>"
        runs.append(
            "".join(f"<td>{html.escape(c)}</td>" for c in cells) + f"<td>{images}</td><td>{folder}</td>"
        )
    header = "".join(f"<th>{h}</th>" for h in ("method", "category", "seed", "status", "heatmaps", "run dir"))
    return f"<h3>Runs</h3><table><tr>{header}</tr>" + "".join(f"<tr>{r}</tr>" for r in runs) + "</table>"


def link(path: Path, page_dir: Path) -> str:
    """``path`` relative to the page, so that the page opens from disk (and moves with its folder)."""
    return html.escape(quote(Path(os.path.relpath(path, page_dir)).as_posix()))


def html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>" for cells in body)
    return f"<table><tr>{head}</tr>{rows}</table>"


def page(title: str, body: Sequence[str]) -> str:
    head = f"<meta charset='utf-8'><title>{title}</title><style>{STYLE}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{''.join(body)}</body></html>\n"
