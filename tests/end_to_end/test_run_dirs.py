"""No run loses another's outputs in silence: default run dirs are unique per process, a folder holding
another config's results (or a run writing there now) is refused, the results database keeps a row per
run, and model files are written whole, with the outputs' mode, and byte for byte reproducibly.

The command-line runs fit PaDiM on 64 px generated images, a few seconds each."""

import fcntl
import json
import os
import re
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
import torch

from anomaly.backbones import FeatureExtractor
from anomaly.data.preprocessing import Preprocessing
from anomaly.data.synthetic import ensure_dataset
from anomaly.errors import ConfigError
from anomaly.methods.padim.model import Padim
from anomaly.model_io import load_model, save_model
from anomaly.reports.database import append_run, read_runs
from anomaly.reports.records import RunRecord
from anomaly.run_dir import LOCK_FILE

pytestmark = pytest.mark.slow  # commands and whole runs: seconds to a minute each

TINY = [
    "method=padim", "logger=none", "threshold.source=none", "dataset.num_workers=0",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "dataset.n_train=4",
    "dataset.n_calibration=0",
    "dataset.n_test_good=2", "dataset.n_test_defect=3", "dataset.generated_size=64", "dataset.image_size=64",
]  # fmt: skip
OUTPUTS = ("run.json", "metrics.json", "config.yaml", "model.safetensors")
BACKBONE = {"name": "resnet18", "layers": ["layer1", "layer2"], "weights": None, "fold_batch_norms": True}


def train_command(root: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "anomaly.cli.train", *TINY, f"dataset.root={root}", *overrides]


def environment() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}


def snapshot(run_dir: Path, database: Path) -> tuple[dict, list]:
    """The run's output files (bytes, modification time) and every row of the database."""
    files = {name: ((run_dir / name).read_bytes(), (run_dir / name).stat().st_mtime_ns) for name in OUTPUTS}
    with closing(sqlite3.connect(database)) as connection:
        rows = connection.execute("SELECT * FROM runs ORDER BY rowid").fetchall()
    return files, rows


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    """Generated once, before two runs could both start generating it."""
    root = tmp_path_factory.mktemp("data") / "synthetic"
    return ensure_dataset(root, ["fabric"], n_train=4, n_test_good=2, n_test_defect=3, image_size=64, seed=0)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, synthetic_root) -> tuple[list[subprocess.CompletedProcess], Path]:
    """Two anomaly-train processes of the same config and seed, started together with the default run
    dir names; returns (their results, the folder they ran in)."""
    cwd = tmp_path_factory.mktemp("together")
    command, pipes = train_command(synthetic_root), {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    processes = [subprocess.Popen(command, cwd=cwd, env=environment(), text=True, **pipes) for _ in range(2)]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results, cwd


def test_two_runs_started_together_keep_their_own_run_dirs_and_rows(two_runs):
    results, cwd = two_runs
    for result in results:
        assert result.returncode == 0, result.stdout + result.stderr
    run_dirs = sorted((cwd / "outputs" / "runs" / "padim" / "fabric").iterdir())
    assert len(run_dirs) == 2
    for run_dir in run_dirs:
        assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-\d{6}_\d+", run_dir.name), run_dir.name
        assert RunRecord.read(run_dir).status == "ok" and (run_dir / "model.safetensors").is_file()
    runs = read_runs(cwd / "outputs" / "runs.sqlite")
    assert sorted(run_dir for _, run_dir in runs) == [run_dir.resolve() for run_dir in run_dirs]
    assert len({record.run_id for record, _ in runs}) == 2


def test_two_seeded_runs_of_one_config_write_byte_identical_model_files(two_runs):
    _, cwd = two_runs
    first, second = sorted((cwd / "outputs" / "runs" / "padim" / "fabric").glob("*/model.safetensors"))
    assert first.read_bytes() == second.read_bytes()


def test_a_run_dir_being_written_now_is_refused_and_left_alone(tmp_path, run_job):
    run_dir = tmp_path / "run"
    RunRecord("padim", None, "synthetic", "fabric", 0, "running").write(run_dir)
    before = (run_dir / "run.json").read_bytes()
    with (run_dir / LOCK_FILE).open("a") as lock:  # as the other anomaly-train holds it
        fcntl.flock(lock, fcntl.LOCK_EX)
        message = f"Another anomaly-train is writing into {re.escape(str(run_dir))} now"
        with pytest.raises(ConfigError, match=message):
            run_job(tmp_path, TINY)
    assert (run_dir / "run.json").read_bytes() == before
    assert not (run_dir / "error.log").exists() and not (tmp_path / "runs.sqlite").exists()


def test_an_old_database_keyed_by_run_dir_is_read_and_migrated(tmp_path):
    database = tmp_path / "runs.sqlite"
    with closing(sqlite3.connect(database)) as connection, connection:
        connection.execute(
            "CREATE TABLE runs (run_dir TEXT PRIMARY KEY, written_at TEXT NOT NULL, dataset TEXT, category "
            "TEXT, method TEXT, backbone TEXT, seed INTEGER, status TEXT, record TEXT NOT NULL)"
        )
        for name, method in (("a", "padim"), ("b", "patchcore")):
            record = json.dumps({"method": method, "backbone": None, "dataset": "visa", "category": "candle",
                                 "seed": 0, "status": "ok"})  # fmt: skip
            values = (str(tmp_path / name), "2024-01-01T00:00:00+00:00", "visa", "candle", method, None, 0,
                      "ok", record)  # fmt: skip
            connection.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
    assert [record.method for record, _ in read_runs(database)] == ["padim", "patchcore"]  # unmigrated

    again = RunRecord("padim", None, "visa", "candle", 0, "failed", error="out of memory")
    append_run(database, again, tmp_path / "a")  # a's folder run again: both of a's rows stay
    append_run(database, again, tmp_path / "a")  # the same run once more: its own row, replaced
    with closing(sqlite3.connect(database)) as connection:
        rows = connection.execute("SELECT run_id, run_dir, status FROM runs ORDER BY rowid").fetchall()
    assert [(Path(run_dir).name, status) for _, run_dir, status in rows] == [
        ("a", "ok"), ("b", "ok"), ("a", "failed"),
    ]  # fmt: skip
    assert len({run_id for run_id, _, _ in rows}) == 3 and rows[2][0] == again.run_id
    assert [(run_dir.name, record.status) for record, run_dir in read_runs(database)] == [
        ("b", "ok"), ("a", "failed"),
    ]  # fmt: skip


@pytest.fixture
def padim() -> Padim:
    model = Padim(FeatureExtractor(**BACKBONE), n_features=20, seed=3)
    model.collect(torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    model.fit()
    return model


def save(model: Padim, path: Path) -> None:
    config = {"n_features": 20, "seed": 3, "backbone": BACKBONE}
    save_model(model, "padim", config, Preprocessing([64, 64], None), path)


@pytest.mark.filterwarnings("ignore:backbone resnet18 is randomly initialised")
def test_a_model_file_is_written_whole_with_the_outputs_mode_and_the_same_bytes(tmp_path, padim, monkeypatch):
    path = tmp_path / "model.safetensors"
    umask = os.umask(0o027)
    try:
        save(padim, path)
    finally:
        os.umask(umask)
    assert oct(path.stat().st_mode & 0o777) == oct(0o640)  # as any output under that umask
    first = path.read_bytes()
    save(padim, path)  # safetensors alone writes its metadata in a random order, in one process too
    assert path.read_bytes() == first and load_model(path).method == "padim"

    def fail(state, filename, metadata):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("anomaly.model_io.save_file", fail)
    with pytest.raises(OSError, match="No space left"):
        save(padim, path)
    assert path.read_bytes() == first  # the earlier file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary file left


def test_a_folder_with_another_configs_results_is_refused_unless_forced(
    tmp_path, run_job, synthetic_root, command_in_process
):
    data = [*TINY, f"dataset.root={synthetic_root}"]
    _, run_dir = run_job(tmp_path, data)  # in this process, like the forced run below: quicker
    database = tmp_path / "runs.sqlite"
    before = snapshot(run_dir, database)

    settings = (f"hydra.run.dir={run_dir}", f"paths.results_db={database}", "seed=1")
    refused = command_in_process("train", *data, *settings, cwd=tmp_path)  # anomaly-train's main(), here
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr and refused.stderr.count("Error:") == 1, refused.stderr
    assert f"Error: {run_dir} already holds the results of a run with another config" in refused.stderr
    assert "force=true" in refused.stderr
    assert snapshot(run_dir, database) == before and not (run_dir / "error.log").exists()

    run_job(tmp_path, [*data, "seed=1", "force=true"])
    assert RunRecord.read(run_dir).seed == 1
    _, rows = snapshot(run_dir, database)
    assert rows[:1] == before[1] and len(rows) == 2  # the earlier run's row stays; the report shows the new
    assert [record.seed for record, _ in read_runs(database)] == [1]
