"""Collecting the run records below a folder into table rows (one dict per run)."""

from pathlib import Path

from anomaly.metrics.registry import reported_metrics
from anomaly.reports.records import RECORD_FILE, RunRecord

RUN_COLUMNS = ("method", "backbone", "variant", "protocol", "dataset", "category", "seed", "status", "shots",
               "shot_draw")  # fmt: skip
PER_CATEGORY, UNIFIED, FEW_SHOT = "per-category", "unified", "few-shot"  # RunRecord.protocol
TIMING_COLUMNS = ("fit_seconds", "test_seconds", "peak_rss_mb")


def columns() -> tuple[str, ...]:
    """results.csv's and the wandb results table's columns: the run, each reported metric, its timings,
    its folder and its error."""
    return (*RUN_COLUMNS, *(metric.key for metric in reported_metrics()), *TIMING_COLUMNS, "run_dir", "error")


def read_rows(run_dir: Path) -> list[dict]:
    """The rows of a run dir's record (:func:`record_rows`); none when it holds none."""
    record = RunRecord.read(run_dir)
    return [] if record is None else record_rows(record, run_dir)


def record_rows(record: RunRecord, run_dir: Path) -> list[dict]:
    """A run's record as table rows: one, or a unified run's one per category (its category's metrics;
    the timings are the whole run's), so that the category tables show it beside the runs of a model per
    category (:func:`method_label` tells them apart by protocol)."""
    row = record_row(record, run_dir)
    if not record.category_metrics:
        return [row]
    measured = {key for metrics in record.category_metrics.values() for key in metrics}
    shared = {key: value for key, value in row.items() if key not in measured}
    return [
        {**shared, "category": category, **metrics} for category, metrics in record.category_metrics.items()
    ]


def record_row(record: RunRecord, run_dir: Path) -> dict:
    """A run's record as one table row (a unified run's: the mean over its categories)."""
    row = {
        "method": record.method,
        "backbone": record.backbone or "",
        "dataset": record.dataset,
        "category": record.category,
        "seed": record.seed,
        "status": record.status,
        "protocol": record.protocol,
        "shots": record.shots,
        "shot_draw": record.shot_draw,
        "run_dir": str(run_dir),
        "overrides": dict(item.split("=", 1) for item in record.variant if "=" in item),
        "wandb": record.wandb,
        **record.metrics,
        **record.timings,
    }
    if record.status == "running":
        return {**row, "status": "failed", "error": "the run was killed (or is still running): no result"}
    return {**row, "error": record.error or ""}


def collect_runs(folder: Path) -> tuple[list[dict], list[dict]]:
    """(rows, repeats) of every run below ``folder``, earlier invocations of a resumed sweep included.

    Rows get a ``variant``: the swept settings that tell runs of one method apart (e.g. a coreset ratio
    sweep), so that only repeats (seeds, and a few-shot run's draws) are ever averaged together. Of several
    runs of one combination (e.g. the same sweep run again with another logger, which makes Hydra pick
    another folder), the newest counts; the others are returned as repeats.
    """
    run_dirs = sorted({path.parent for path in folder.rglob(RECORD_FILE)})
    rows = [row for run_dir in run_dirs for row in read_rows(run_dir)]
    rows.sort(key=lambda r: (Path(r["run_dir"]) / RECORD_FILE).stat().st_mtime)
    return newest_per_combination(rows)


def newest_per_combination(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(kept, repeats) of ``rows`` given oldest first: the newest run of each (method label, data set,
    category, shots, seed, draw) is kept, sorted for tables; ``variant`` is set on every row
    (:func:`add_variants`)."""
    add_variants(rows)
    newest: dict[tuple, dict] = {}
    for row in rows:
        newest[(method_label(row), row["dataset"], str(row["category"]), row.get("shots"), *repeat(row))] = (
            row
        )
    kept = sorted(
        newest.values(),
        key=lambda r: (r["dataset"], method_label(r), str(r["category"]), r.get("shots") or 0, r["seed"] or 0,
                       r.get("shot_draw") or 0),
    )  # fmt: skip
    kept_ids = {id(row) for row in kept}
    return kept, [row for row in rows if id(row) not in kept_ids]


def repeat(row: dict) -> tuple[int, int]:
    """What tells repeats of one setting apart, which the tables average over: (seed, few-shot draw)."""
    return row["seed"], row.get("shot_draw") or 0


def of_protocol(rows: list[dict], protocol: str) -> list[dict]:
    """The rows of one protocol (RunRecord.protocol); the reports show few-shot runs apart."""
    return [row for row in rows if row.get("protocol", PER_CATEGORY) == protocol]


def on_all_images(rows: list[dict]) -> list[dict]:
    """The rows of models fitted on all normal training images: a model per category and unified models,
    which the category tables show side by side (:func:`method_label` tells them apart)."""
    return [row for row in rows if row.get("protocol", PER_CATEGORY) != FEW_SHOT]


def add_variants(rows: list[dict]) -> None:
    """Sets each row's ``variant``: its values of the settings that differ between the rows."""
    keys = {key for row in rows for key in row["overrides"]}
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


def one_line(text: str, limit: int = 400) -> str:
    """A (possibly multi-line) error for a table cell: its lines joined, cut at ``limit`` characters."""
    joined = " / ".join(line.strip() for line in text.splitlines() if line.strip())
    return joined if len(joined) <= limit else joined[: limit - 1] + "…"


def method_label(row: dict) -> str:
    """The method, its backbone, its variant and whether one model serves several categories: what a
    table's column is (``patchcore (resnet18) [coreset_ratio=0.01] · unified``). Few-shot runs keep the
    plain label: their own tables set them beside the same method's runs on all images."""
    label = f"{row['method']} ({row['backbone']})" if row["backbone"] else row["method"]
    label = f"{label} [{row['variant']}]" if row.get("variant") else label
    return f"{label} · {UNIFIED}" if row.get("protocol") == UNIFIED else label
