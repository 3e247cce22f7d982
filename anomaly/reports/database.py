"""The results database: one SQLite file per output root (``outputs/runs.sqlite``), a row per run.

Every ``anomaly-train`` job appends its record here when it ends, success or failure, whatever sweep or
data set it belongs to, so that ``anomaly-report outputs/`` compares runs across sweeps and benchmarks
without wandb. A run dir run again replaces its row. The row holds the run's record (``run.json``) as
JSON, plus the table axes as columns for a user's own queries::

    sqlite3 outputs/runs.sqlite "SELECT dataset, method, category,
        json_extract(record, '$.metrics.image_auroc') FROM runs WHERE status = 'ok'"

SQLite locks the file for each append (several local jobs at once are fine); on a network file system
(cluster sweeps) its locking is unreliable: point ``paths.results_db`` at a local disk, or null.
"""

import json
import sqlite3
from contextlib import closing
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from anomaly.reports.records import RunRecord

DATABASE_FILE = "runs.sqlite"
SCHEMA = """CREATE TABLE IF NOT EXISTS runs (
    run_dir TEXT PRIMARY KEY, written_at TEXT NOT NULL, dataset TEXT, category TEXT, method TEXT,
    backbone TEXT, seed INTEGER, status TEXT, record TEXT NOT NULL)"""
LOCK_TIMEOUT_SECONDS = 60  # parallel jobs of a sweep wait for each other's appends


def append_run(database: Path, record: RunRecord, run_dir: Path) -> None:
    """Adds (or, for a run dir run again, replaces) the run's row."""
    database.parent.mkdir(parents=True, exist_ok=True)
    values = (
        str(run_dir.resolve()), datetime.now(UTC).isoformat(timespec="seconds"), record.dataset,
        record.category, record.method, record.backbone, record.seed, record.status,
        json.dumps(asdict(record)),
    )  # fmt: skip
    with closing(sqlite3.connect(database, timeout=LOCK_TIMEOUT_SECONDS)) as connection, connection:
        connection.execute(SCHEMA)
        connection.execute("INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", values)


def read_runs(database: Path) -> list[tuple[RunRecord, Path]]:
    """Every run's (record, run dir), oldest first."""
    with closing(sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)) as connection:
        rows = connection.execute("SELECT record, run_dir FROM runs ORDER BY written_at, rowid").fetchall()
    return [(RunRecord(**json.loads(record)), Path(run_dir)) for record, run_dir in rows]
