"""report.html: the tables, the plots and every run with its heatmaps; opens from disk, no server."""

import html
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from anomaly.reports.collect import method_label, one_line
from anomaly.reports.tables import Table


def report_html(
    rows: list[dict], tables: dict[str, Table], notes: Sequence[str], plots: list[Path], sweep_dir: Path
) -> str:
    """A self-contained page: relative links only, so it opens from disk in any browser, without a server."""

    def link(path: Path) -> str:
        return html.escape(quote(path.relative_to(sweep_dir).as_posix()))

    n_failed = sum(r["status"] != "ok" for r in rows)
    body = [
        f"<h1>Benchmark report</h1><p>{html.escape(str(sweep_dir))}: {len(rows)} runs, {n_failed} failed.</p>"
    ]
    body += [f"<p class='note'>{html.escape(note)}</p>" for note in notes]
    for metric, (header, cells) in tables.items():
        body.append(f"<h2>{metric} (×100)</h2>" + html_table(header, cells))
    body += [f'<h2>{p.stem}</h2><img src="{link(p)}" alt="{p.stem}">' for p in plots]
    runs = []
    for row in rows:
        run_dir = Path(row["run_dir"])
        heatmaps = sorted((run_dir / "heatmaps").glob("*.png"))[:3]
        images = "".join(f'<img class="heat" src="{link(h)}" alt="{h.stem}">' for h in heatmaps)
        status = row["status"] if row["status"] == "ok" else f"failed: {one_line(row.get('error', ''))}"
        cells = [method_label(row), str(row["category"]), str(row["seed"]), status]
        runs.append("".join(f"<td>{html.escape(c)}</td>" for c in cells) + f"<td>{images}</td>"
                    f"<td><a href='{link(run_dir)}'>{html.escape(run_dir.name)}</a></td>")  # fmt: skip
    header = "".join(f"<th>{h}</th>" for h in ("method", "category", "seed", "status", "heatmaps", "run dir"))
    body.append(
        f"<h2>Runs</h2><table><tr>{header}</tr>" + "".join(f"<tr>{r}</tr>" for r in runs) + "</table>"
    )
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img.heat{height:90px}.note{color:#a60}"
    )
    head = f"<meta charset='utf-8'><title>anomaly benchmark</title><style>{style}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{''.join(body)}</body></html>\n"


def html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>" for cells in body)
    return f"<table><tr>{head}</tr>{rows}</table>"
