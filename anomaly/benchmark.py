"""Collecting a Hydra multirun into results.csv, summary.md, per-metric plots and report.html.

:class:`CollectResults` is a Hydra callback (configs/hydra/default.yaml), so every sweep gets its
tables, whatever the launcher (basic, joblib, submitit): each job leaves ``metrics.json`` (or
``error.json``) and ``config.yaml`` in its run dir, and at the end of the sweep the callback reads them
all in the launching process. A failed job is listed with its error and makes the command exit
non-zero after the reports are written. Runs that used the wandb logger also get the tables as a
``wandb.Table`` in one summary run of the sweep's group. ``python -m anomaly.benchmark SWEEP_DIR``
writes the same reports again (e.g. after a cluster sweep whose launching process was gone).
"""

import argparse
import csv
import html
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from statistics import mean, stdev
from urllib.parse import quote

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from anomaly.data.mvtec import MVTEC_CATEGORIES

log = logging.getLogger(__name__)

METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max")
COLUMNS = (
    "method", "backbone", "variant", "dataset", "category", "seed", "status", *METRICS,
    "fit_seconds", "test_seconds", "peak_rss_mb", "run_dir", "error",
)  # fmt: skip
REFERENCES_FILE = Path(__file__).with_name("paper_results.yaml")
# Command-line overrides that are a table axis, or do not change results: never part of a run's variant.
NOT_VARIANTS = frozenset({
    "method", "backbone", "dataset", "dataset.category", "seed", "experiment", "hparams_search",
    "benchmark_name", "dataset.root", "force", "logger", "num_threads", "reuse_freed_memory",
    "optimized_metric", "dataset.num_workers", "trainer.enable_progress_bar", "trainer.enable_model_summary",
})  # fmt: skip
Table = tuple[list[str], list[list[str]]]  # header, body rows


def run_config(path: Path) -> dict | None:
    """A run's config from ``path``; None if missing or not ours (e.g. wandb also writes config.yaml)."""
    if not path.is_file():
        return None
    config = yaml.safe_load(path.read_text())
    method = config.get("method") if isinstance(config, dict) else None
    return config if isinstance(method, dict) and "name" in method else None


def read_run(run_dir: Path) -> dict | None:
    """One row from a run dir, None when it holds no run.

    The resolved ``config.yaml`` is written when a run starts; a run that failed before (a config error)
    is read from Hydra's unresolved ``.hydra/config.yaml``. error.json wins over metrics.json: it is
    only there when the latest attempt failed.
    """
    config = run_config(run_dir / "config.yaml") or run_config(run_dir / ".hydra" / "config.yaml")
    if config is None:
        return None
    dataset = config.get("dataset") or {}
    loggers = config.get("logger") or {}
    row = {
        "method": config["method"]["name"],
        "backbone": (config.get("backbone") or {}).get("name", ""),
        "dataset": dataset_name(dataset),
        "category": dataset.get("category") or Path(str(dataset.get("root", "data"))).name,
        "seed": config.get("seed"),
        "run_dir": str(run_dir),
        "overrides": run_overrides(run_dir),
        "wandb": loggers.get("wandb"),
    }
    if (run_dir / "error.json").is_file():
        return {**row, "status": "failed", "error": json.loads((run_dir / "error.json").read_text())["error"]}
    if (run_dir / "metrics.json").is_file():
        return {**row, "status": "ok", **json.loads((run_dir / "metrics.json").read_text())}
    return {**row, "status": "failed", "error": "no metrics.json: the run was killed or is still running"}


def dataset_name(dataset: dict) -> str:
    """``anomaly.data.mvtec.MVTecAD`` → ``mvtec``: the dataset config group the run used."""
    parts = str(dataset.get("_target_", "")).split(".")
    return parts[-2] if len(parts) > 1 else ""


def run_overrides(run_dir: Path) -> dict[str, str]:
    """The run's command-line overrides (Hydra's ``.hydra/overrides.yaml``) as {key: value}."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    pairs = [item.split("=", 1) for item in yaml.safe_load(path.read_text()) or [] if "=" in item]
    return {key.lstrip("+~"): value for key, value in pairs}


def collect_runs(sweep_dir: Path) -> tuple[list[dict], list[dict]]:
    """(rows, repeats) of every run below ``sweep_dir``, earlier invocations of a resumed sweep included.

    Rows get a ``variant``: the swept settings that tell runs of one method apart (e.g. a coreset ratio
    sweep), so that only seeds are ever averaged together. Of several runs of one combination (e.g. the
    same sweep run again with another logger, which makes Hydra pick another folder), the newest counts;
    the others are returned as repeats.
    """
    run_dirs = {
        p.parent.parent if p.parent.name == ".hydra" else p.parent for p in sweep_dir.rglob("config.yaml")
    }
    rows = [row for run_dir in sorted(run_dirs) if (row := read_run(run_dir))]
    add_variants(rows)
    newest: dict[tuple, dict] = {}
    for row in sorted(rows, key=finished_at):
        newest[(method_label(row), row["dataset"], str(row["category"]), row["seed"])] = row
    kept = sorted(newest.values(), key=lambda r: (method_label(r), str(r["category"]), r["seed"] or 0))
    kept_ids = {id(row) for row in kept}
    repeats = [row for row in rows if id(row) not in kept_ids]
    return kept, repeats


def finished_at(row: dict) -> float:
    run_dir = Path(row["run_dir"])
    files = [run_dir / name for name in ("error.json", "metrics.json", "config.yaml")]
    return max((f.stat().st_mtime for f in files if f.is_file()), default=0.0)


def add_variants(rows: list[dict]) -> None:
    """Sets each row's ``variant``: its values of the overrides that differ between the rows."""
    keys = {key for row in rows for key in row["overrides"]}
    keys = {key for key in keys if key not in NOT_VARIANTS and not key.startswith(("hydra", "logger."))}
    varying = sorted(key for key in keys if len({row["overrides"].get(key) for row in rows}) > 1)
    short = {key: key.rsplit(".", 1)[-1] for key in varying}
    if len(set(short.values())) < len(short):
        short = {key: key for key in varying}
    for row in rows:
        overrides = row["overrides"]
        row["variant"] = ",".join(
            f"{short[k]}={format_value(overrides[k])}" for k in varying if k in overrides
        )


def format_value(value: str) -> str:
    """Optuna's floats (0.05342867...) shortened to 4 significant digits; anything else as given."""
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.4g}" if "." in value or "e" in value.lower() else value


def method_label(row: dict) -> str:
    label = f"{row['method']} ({row['backbone']})" if row["backbone"] else row["method"]
    return f"{label} [{row['variant']}]" if row.get("variant") else label


def write_results_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def aggregate(rows: list[dict], metric: str) -> dict[tuple[str, str], dict[int, float]]:
    """(category, method label) → {seed: metric} of the successful runs."""
    table: dict[tuple[str, str], dict[int, float]] = {}
    for row in rows:
        if row["status"] == "ok" and row.get(metric) is not None:
            table.setdefault((str(row["category"]), method_label(row)), {})[row["seed"]] = float(row[metric])
    return table


def format_cell(values: Sequence[float]) -> str:
    """×100 with one decimal; mean ± sample std when there are several seeds."""
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * mean(values):.1f} ± {100 * stdev(values):.1f}"


def load_references() -> dict:
    """Published numbers in percent: {method: {source, dataset, backbone, metrics: {metric: {category}}}}."""
    return yaml.safe_load(REFERENCES_FILE.read_text()) if REFERENCES_FILE.is_file() else {}


def applicable_reference(references: dict, rows: list[dict]) -> dict:
    """The paper's {metric: {category: value}} for one method label, if all its runs are comparable: the
    paper's data set and backbone (a published WRN50 number says little about our Lite0 runs)."""
    reference = references.get(rows[0]["method"], {})
    comparable = all(
        r["dataset"] == reference.get("dataset") and r["backbone"] == reference.get("backbone") for r in rows
    )
    return reference.get("metrics", {}) if reference and comparable else {}


def published_mean(published: dict, categories: list[str]) -> float | None:
    """The paper number beside our mean row: its own mean when we ran all of MVTec AD, else the mean of its
    per-category values over our categories (None when one of them has no published value)."""
    if set(categories) == set(MVTEC_CATEGORIES) and "mean" in published:
        return published["mean"]
    values = [published.get(c) for c in categories]
    return None if any(v is None for v in values) else mean(values)


def column_mean(values: dict, categories: list[str], label: str) -> list[float] | None:
    """The mean over categories per seed (seeds that all categories have); None when a category has no
    result (then there is no fair mean)."""
    per_category = [values.get((c, label)) for c in categories]
    if not all(per_category):
        return None
    seeds = sorted(set.intersection(*(set(v) for v in per_category)))
    return [mean(v[s] for v in per_category) for s in seeds] or None


def summary_tables(rows: list[dict]) -> dict[str, Table]:
    """Per metric: categories × method labels (×100, mean ± std over seeds), a mean row, and the paper's
    value with our difference (Δ) where the runs are comparable to it."""
    references = load_references()
    labels = sorted({method_label(r) for r in rows})
    categories = sorted({str(r["category"]) for r in rows})
    failed = {(str(r["category"]), method_label(r)) for r in rows if r["status"] != "ok"}
    paper = {
        label: applicable_reference(references, [r for r in rows if method_label(r) == label])
        for label in labels
    }
    tables = {}
    for metric in METRICS:
        values = aggregate(rows, metric)
        header = ["category"]
        for label in labels:
            header += [label] + ([f"{label.split(' ')[0]} paper", "Δ"] if metric in paper[label] else [])
        body = []
        for category in [*categories, "mean"]:
            cells = [category]
            for label in labels:
                if category == "mean":
                    ours = column_mean(values, categories, label)
                    incomplete = any(label == f for _, f in failed)
                else:
                    ours = list(values.get((category, label), {}).values()) or None
                    incomplete = (category, label) in failed
                cells.append(result_cell(ours, incomplete, category == "mean"))
                if metric in paper[label]:
                    published = paper[label][metric]
                    value = (
                        published_mean(published, categories)
                        if category == "mean"
                        else published.get(category)
                    )
                    cells += reference_cells(ours, value)
            body.append(cells)
        tables[metric] = (header, body)
    return tables


def result_cell(values: list[float] | None, incomplete: bool, is_mean: bool) -> str:
    """Our value, marked ⚠ when some of its runs failed; "failed" when all did, "–" when none ran."""
    if values:
        return format_cell(values) + (" ⚠" if incomplete else "")
    if incomplete:
        return "– ⚠" if is_mean else "failed"
    return "–"


def reference_cells(values: list[float] | None, published: float | None) -> list[str]:
    if published is None:
        return ["–", "–"]
    return [f"{published:.1f}", f"{100 * mean(values) - published:+.1f}" if values else "–"]


def summary_markdown(rows: list[dict], tables: dict[str, Table], notes: Sequence[str]) -> str:
    n_failed = sum(r["status"] != "ok" for r in rows)
    lines = [
        "# Benchmark summary",
        "",
        f"{len(rows)} runs, {n_failed} failed. Values ×100, mean ± std over seeds.",
    ]
    lines += [f"\n{note}" for note in notes] + [""]
    for metric, (header, body) in tables.items():
        lines += [f"## {metric}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(f"**{c}**" if c == "mean" else c for c in cells) + " |" for cells in body]
        lines.append("")
    if n_failed:
        lines += ["## Failed runs", ""]
        lines += [
            f"- {method_label(r)} / {r['category']} (seed {r['seed']}): {r['error']}"
            for r in rows
            if r["status"] != "ok"
        ]
        lines.append("")
    references = load_references()
    methods = {r["method"] for r in rows} & set(references)
    if methods:
        lines.append("Paper numbers, shown only beside MVTec AD runs with the paper's backbone:")
        lines += [
            f"- {m} ({references[m].get('backbone')}): {references[m].get('source')}" for m in sorted(methods)
        ]
    return "\n".join(lines) + "\n"


def save_plots(rows: list[dict], folder: Path) -> list[Path]:
    """One grouped bar chart per metric: categories on x, a bar per method label (mean, ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    categories = sorted({str(r["category"]) for r in rows})
    labels = sorted({method_label(r) for r in rows})
    for metric in METRICS:
        values = aggregate(rows, metric)
        if not values:
            continue
        figure, axis = plt.subplots(figsize=(max(6, 0.9 * len(categories) * max(1, len(labels))), 3.5))
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            per_category = [list(values.get((c, label), {}).values()) for c in categories]
            heights = [mean(v) if v else math.nan for v in per_category]
            errors = [stdev(v) if len(v) > 1 else 0.0 for v in per_category]
            axis.bar(
                [x + i * width for x in range(len(categories))], heights, width, yerr=errors, label=label
            )
        axis.set_xticks(
            [x + 0.4 - width / 2 for x in range(len(categories))], categories, rotation=30, ha="right"
        )
        axis.set_ylim(max(0.0, min(v for d in values.values() for v in d.values()) - 0.05), 1.0)
        axis.set_ylabel(metric)
        axis.legend(fontsize=8)
        figure.tight_layout()
        paths.append(folder / f"{metric}.png")
        figure.savefig(paths[-1], dpi=90)
        plt.close(figure)
    return paths


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
        status = row["status"] if row["status"] == "ok" else f"failed: {row.get('error', '')}"
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


def write_reports(
    sweep_dir: Path, notes: Sequence[str] = ()
) -> tuple[list[dict], dict[str, Table], list[Path]]:
    """results.csv, summary.md, plots/ and report.html into ``sweep_dir``; returns (rows, tables, plots)."""
    rows, repeats = collect_runs(sweep_dir)
    if repeats:
        notes = [*notes, f"Ignored {len(repeats)} older run(s) of a combination that was run again: "
                 + ", ".join(Path(r["run_dir"]).name for r in repeats)]  # fmt: skip
    write_results_csv(rows, sweep_dir / "results.csv")
    tables = summary_tables(rows)
    (sweep_dir / "summary.md").write_text(summary_markdown(rows, tables, notes))
    plots = save_plots(rows, sweep_dir / "plots")
    (sweep_dir / "report.html").write_text(report_html(rows, tables, notes, plots, sweep_dir))
    return rows, tables, plots


def log_to_wandb(rows: list[dict], tables: dict[str, Table], plots: list[Path], sweep_dir: Path) -> None:
    """One wandb run per sweep, in the group its runs share (the sweep folder's name, see
    configs/logger/wandb.yaml), holding results.csv and the summary tables as ``wandb.Table``s and the
    plots. Only when the sweep's runs used the wandb logger, and offline unless they were all online."""
    settings = [row["wandb"] for row in rows if row.get("wandb")]
    if not settings:
        return
    import wandb

    run = wandb.init(
        project=settings[0].get("project", "anomaly"),
        group=sweep_dir.name,
        job_type="summary",
        name=f"{sweep_dir.name}-summary",
        dir=str(sweep_dir),
        mode="offline" if any(s.get("offline", True) for s in settings) else "online",
        config={"sweep_dir": str(sweep_dir)},
    )
    results = wandb.Table(columns=list(COLUMNS), data=[[row.get(c) for c in COLUMNS] for row in rows])
    summaries = {
        f"summary/{metric}": wandb.Table(columns=header, data=body)
        for metric, (header, body) in tables.items()
    }
    run.log({"results": results, **summaries, **{f"plots/{p.stem}": wandb.Image(str(p)) for p in plots}})
    run.finish()


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
    if dataset_name(config.dataset) == "mvtec":
        notes.append(
            "WARNING: these hyper-parameters were chosen on MVTec AD test images, so the numbers above are "
            "optimistic and must not be reported as test results. Tune on generated data (the default of "
            "configs/hparams_search/) or on categories you do not report."
        )
    return notes


class CollectResults(Callback):
    """At the end of a multirun, in the launching process: reports, then a non-zero exit if a job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        failed = finish_sweep(sweep_dir, search_notes(config, sweep_dir))
        if failed:
            raise SystemExit(f"{len(failed)} run(s) failed: see {sweep_dir / 'summary.md'}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write results.csv, summary.md, plots/ and report.html of a sweep."
    )
    parser.add_argument("sweep_dir", type=Path, help="the multirun's folder (hydra.sweep.dir)")
    args = parser.parse_args(argv)
    return 1 if finish_sweep(args.sweep_dir) else 0


if __name__ == "__main__":
    sys.exit(main())
