"""The results database: one SQLite file per output root (``outputs/runs.sqlite``), a row per run.

Every ``anomaly-train`` job appends its record here when it ends, success or failure, whatever sweep or
data set it belongs to, so that ``anomaly-report outputs/`` compares runs across sweeps and benchmarks
without wandb. Rows are keyed by the run's id (``RunRecord.run_id``), never by its folder: no run replaces
another's row. A run dir run again (a failed run redone, or ``force=true``) keeps both rows; the folder
holds the latest run's files, so :func:`read_runs`, and with it ``anomaly-report``, shows that one. The row
holds the run's record (``run.json``) as JSON, plus the table axes as columns for a user's own queries::

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
COLUMNS = "run_dir, written_at, dataset, category, method, backbone, seed, status, record"
SCHEMA = """CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, run_dir TEXT NOT NULL, written_at TEXT NOT NULL, dataset TEXT, category TEXT,
    method TEXT, backbone TEXT, seed INTEGER, status TEXT, record TEXT NOT NULL)"""
LOCK_TIMEOUT_SECONDS = 60  # parallel jobs of a sweep wait for each other's appends


def append_run(database: Path, record: RunRecord, run_dir: Path) -> None:
    """Adds the run's row, or replaces its own earlier row (a run that fails after its record was written)."""
    database.parent.mkdir(parents=True, exist_ok=True)
    values = (
        record.run_id, str(run_dir.resolve()), datetime.now(UTC).isoformat(timespec="seconds"),
        record.dataset, record.category, record.method, record.backbone, record.seed, record.status,
        json.dumps(asdict(record)),
    )  # fmt: skip
    with closing(sqlite3.connect(database, timeout=LOCK_TIMEOUT_SECONDS)) as connection, connection:
        connection.execute("BEGIN IMMEDIATE")  # the write lock before the schema is read: one migration
        migrate(connection)
        connection.execute(SCHEMA)
        connection.execute(f"INSERT OR REPLACE INTO runs (run_id, {COLUMNS}) VALUES ({', '.join('?' * 10)})",
                           values)  # fmt: skip


def migrate(connection: sqlite3.Connection) -> None:
    """A database of the first schema (keyed by run dir, a run replacing the folder's earlier run) gets
    the run id key; its rows are kept, in their order, each with an id of its own."""
    columns = {row[1] for row in connection.execute("PRAGMA table_info(runs)")}
    if not columns or "run_id" in columns:
        return
    connection.execute("ALTER TABLE runs RENAME TO runs_by_dir")
    connection.execute(SCHEMA)
    connection.execute(
        f"INSERT INTO runs (run_id, {COLUMNS}) "
        f"SELECT lower(hex(randomblob(16))), {COLUMNS} FROM runs_by_dir ORDER BY rowid"
    )
    connection.execute("DROP TABLE runs_by_dir")


def read_runs(database: Path) -> list[tuple[RunRecord, Path]]:
    """Each run dir's latest run as (record, run dir), oldest first (either schema: read-only)."""
    with closing(sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)) as connection:
        rows = connection.execute("SELECT record, run_dir FROM runs ORDER BY written_at, rowid").fetchall()
    latest: dict[str, str] = {}
    for record, run_dir in rows:
        latest.pop(run_dir, None)  # a later run in the same folder: it moves to the end
        latest[run_dir] = record
    return [(RunRecord(**json.loads(record)), Path(run_dir)) for run_dir, record in latest.items()]
