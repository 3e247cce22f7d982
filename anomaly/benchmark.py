"""Collecting a Hydra multirun into results.csv, summary.md, per-metric plots and report.html.

:class:`CollectResults` is a Hydra callback (configs/hydra/default.yaml), so every sweep gets its
tables: each job leaves ``metrics.json`` (or ``error.json``) and ``config.yaml`` in its run dir, and
at the end of the sweep the callback reads them all. A failed job is listed with its error and
makes the command exit non-zero after the summary is written.
"""

import csv
import html
import json
import logging
import math
from pathlib import Path
from statistics import mean, stdev

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max")
COLUMNS = (
    "method", "backbone", "category", "seed", "status", *METRICS,
    "fit_seconds", "test_seconds", "peak_rss_mb", "run_dir", "error",
)  # fmt: skip
REFERENCES_FILE = Path(__file__).with_name("paper_results.yaml")


def read_run(run_dir: Path) -> dict | None:
    """One row from a run dir (None if the dir holds no run)."""
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        return None
    config = yaml.safe_load(config_file.read_text())
    dataset = config.get("dataset", {})
    row = {
        "method": config["method"]["name"],
        "backbone": config.get("backbone", {}).get("name", ""),
        "category": dataset.get("category") or Path(str(dataset.get("root", "data"))).name,
        "seed": config.get("seed"),
        "run_dir": str(run_dir),
    }
    if (run_dir / "metrics.json").is_file():
        return {**row, "status": "ok", **json.loads((run_dir / "metrics.json").read_text())}
    error = run_dir / "error.json"
    message = json.loads(error.read_text())["error"] if error.is_file() else "no metrics.json (killed?)"
    return {**row, "status": "failed", "error": message}


def collect_runs(sweep_dir: Path) -> list[dict]:
    """Rows of every run dir below ``sweep_dir``, sorted by method, category, seed."""
    run_dirs = [p.parent for p in sorted(sweep_dir.rglob("config.yaml")) if p.parent.name != ".hydra"]
    rows = [row for run_dir in run_dirs if (row := read_run(run_dir))]
    return sorted(rows, key=lambda r: (r["method"], r["backbone"], str(r["category"]), r["seed"] or 0))


def write_results_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def aggregate(rows: list[dict], metric: str) -> dict[tuple[str, str], list[float]]:
    """(category, method label) → the metric over seeds."""
    table: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        if row["status"] == "ok" and row.get(metric) is not None:
            table.setdefault((str(row["category"]), method_label(row)), []).append(float(row[metric]))
    return table


def method_label(row: dict) -> str:
    return f"{row['method']} ({row['backbone']})" if row["backbone"] else row["method"]


def format_cell(values: list[float] | None) -> str:
    if not values:
        return "failed"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * mean(values):.1f} ± {100 * stdev(values):.1f}"


def load_references() -> dict:
    """Published numbers: {method: {metric: {category: value}}} plus their sources."""
    return yaml.safe_load(REFERENCES_FILE.read_text()) if REFERENCES_FILE.is_file() else {}


def summary_markdown(rows: list[dict]) -> str:
    """Categories × methods per metric (×100, mean ± std over seeds), a mean row, paper numbers beside."""
    references = load_references()
    methods = sorted({method_label(r) for r in rows})
    categories = sorted({str(r["category"]) for r in rows})
    failed = {(str(r["category"]), method_label(r)) for r in rows if r["status"] != "ok"}
    lines = ["# Benchmark summary", "", f"{len(rows)} runs, {len(failed)} failed. Values ×100.", ""]
    for metric in METRICS:
        table = aggregate(rows, metric)
        paper = {m: references.get(m.split(" ")[0], {}).get("metrics", {}).get(metric, {}) for m in methods}
        header = ["category"]
        for m in methods:
            header += [m] + ([f"{m.split(' ')[0]} paper", "Δ"] if paper[m] else [])
        lines += [f"## {metric}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for category in [*categories, "mean"]:
            cells = [f"**{category}**" if category == "mean" else category]
            for m in methods:
                values = column_mean(table, categories, m) if category == "mean" else table.get((category, m))
                mark = " ⚠" if (category, m) in failed else ""
                cells.append(format_cell(values) + mark)
                if paper[m]:
                    published = paper[m].get(category)
                    if category == "mean" and published is None:
                        published = paper[m].get("mean")
                    cells += reference_cells(values, published)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if failed:
        lines += ["## Failed runs", ""]
        lines += [
            f"- {r['method']} / {r['category']} (seed {r['seed']}): {r['error']}"
            for r in rows
            if r["status"] != "ok"
        ]
    sources = {m: references[m]["source"] for m in references if "source" in references[m]}
    if sources:
        lines += ["", "Paper numbers: " + "; ".join(f"{m}: {s}" for m, s in sources.items())]
    return "\n".join(lines) + "\n"


def column_mean(table: dict, categories: list[str], method: str) -> list[float] | None:
    """Mean over categories, per seed position; None when any category is missing (then no fair mean)."""
    per_category = [table.get((c, method)) for c in categories]
    if any(not values for values in per_category):
        return None
    seeds = min(len(values) for values in per_category)
    return [mean(values[i] for values in per_category) for i in range(seeds)]


def reference_cells(values: list[float] | None, published: float | None) -> list[str]:
    if published is None:
        return ["–", "–"]
    delta = f"{100 * mean(values) - published:+.1f}" if values else "–"
    return [f"{published:.1f}", delta]


def save_plots(rows: list[dict], folder: Path) -> list[Path]:
    """One grouped bar chart per metric: categories on x, a bar per method (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    categories = sorted({str(r["category"]) for r in rows})
    methods = sorted({method_label(r) for r in rows})
    for metric in METRICS:
        table = aggregate(rows, metric)
        if not table:
            continue
        figure, axis = plt.subplots(figsize=(max(6, 0.9 * len(categories) * max(1, len(methods))), 3.5))
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            heights = [mean(table.get((c, method)) or [math.nan]) for c in categories]
            axis.bar([x + i * width for x in range(len(categories))], heights, width, label=method)
        axis.set_xticks(
            [x + 0.4 - width / 2 for x in range(len(categories))], categories, rotation=30, ha="right"
        )
        axis.set_ylim(max(0.0, min(v for vs in table.values() for v in vs) - 0.05), 1.0)
        axis.set_ylabel(metric)
        axis.legend(fontsize=8)
        figure.tight_layout()
        paths.append(folder / f"{metric}.png")
        figure.savefig(paths[-1], dpi=90)
        plt.close(figure)
    return paths


def report_html(rows: list[dict], summary: str, plots: list[Path], sweep_dir: Path) -> str:
    """A self-contained page (relative links only; opens from disk in any browser, no server)."""
    body = [f"<h1>Benchmark report</h1><p>{html.escape(str(sweep_dir))}</p>"]
    body += [markdown_tables_to_html(summary)]
    body += [f'<h2>{p.stem}</h2><img src="{p.relative_to(sweep_dir)}" alt="{p.stem}">' for p in plots]
    body.append("<h2>Runs</h2><table><tr><th>method</th><th>category</th><th>seed</th><th>status</th>"
                "<th>heatmaps</th><th>run dir</th></tr>")  # fmt: skip
    for row in rows:
        run_dir = Path(row["run_dir"])
        heatmaps = sorted((run_dir / "heatmaps").glob("*.png"))[:3]
        images = "".join(f'<img class="heat" src="{h.relative_to(sweep_dir)}">' for h in heatmaps)
        link = run_dir.relative_to(sweep_dir)
        status = html.escape(row["status"] if row["status"] == "ok" else f"failed: {row.get('error', '')}")
        body.append(
            f"<tr><td>{html.escape(row['method'])}</td><td>{html.escape(str(row['category']))}</td>"
            f"<td>{row['seed']}</td><td>{status}</td><td>{images}</td>"
            f"<td><a href='{link}'>{link}</a></td></tr>"
        )
    body.append("</table>")
    style = (
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img.heat{height:90px}"
    )
    head = f"<meta charset='utf-8'><title>anomaly benchmark</title><style>{style}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{''.join(body)}</body></html>\n"


def markdown_tables_to_html(markdown: str) -> str:
    """The summary's headings and pipe tables as HTML (the only markdown summary_markdown writes)."""
    out, in_table = [], False
    for line in markdown.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [html.escape(c.strip()).replace("**", "") for c in line.strip("|").split("|")]
            tag = "th" if not in_table else "td"
            out.append(
                ("<table>" if not in_table else "")
                + "<tr>"
                + "".join(f"<{tag}>{c}</{tag}>" for c in cells)
                + "</tr>"
            )
            in_table = True
            continue
        if in_table and not line.startswith("|"):
            out.append("</table>")
            in_table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level + 1}>{html.escape(line.lstrip('# '))}</h{level + 1}>")
        elif line.strip() and not line.startswith("|"):
            out.append(f"<p>{html.escape(line)}</p>")
    return "\n".join(out + (["</table>"] if in_table else []))


def write_reports(sweep_dir: Path) -> list[dict]:
    """Writes results.csv, summary.md, plots/ and report.html into ``sweep_dir``; returns the rows."""
    rows = collect_runs(sweep_dir)
    write_results_csv(rows, sweep_dir / "results.csv")
    summary = summary_markdown(rows)
    (sweep_dir / "summary.md").write_text(summary)
    plots = save_plots(rows, sweep_dir / "plots")
    (sweep_dir / "report.html").write_text(report_html(rows, summary, plots, sweep_dir))
    return rows


class CollectResults(Callback):
    """At the end of a multirun: the reports; then a non-zero exit if any job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_reports(sweep_dir)
        failed = [r for r in rows if r["status"] != "ok"]
        log.info("Sweep results: %s (%d runs, %d failed)", sweep_dir / "summary.md", len(rows), len(failed))
        print((sweep_dir / "summary.md").read_text())
        if failed:
            raise SystemExit(f"{len(failed)} of {len(rows)} runs failed: see {sweep_dir / 'summary.md'}")
