"""Sweeps: the collector (results.csv, summary.md, report.html, the wandb table) on hand-written run
records, and real multiruns through `python -m anomaly.cli.train -m`: resume, fault isolation, the joblib and
submitit launchers, an Optuna search. The real runs fit PaDiM on 64 px images, a few seconds each."""

import csv
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict
from PIL import Image

from anomaly.cli.report import main as main_report
from anomaly.config import config_dir
from anomaly.data.mvtec import MVTEC_CATEGORIES
from anomaly.data.synthetic import ensure_dataset
from anomaly.reports.database import append_run, read_runs
from anomaly.reports.records import RunRecord
from anomaly.reports.sweep import finish_sweep, search_notes, write_reports

pytestmark = pytest.mark.slow  # commands and whole runs: seconds to a minute each

CONFIG_DIR = config_dir()
TINY_RUN = [
    "method=padim",
    "logger=csv",
    "dataset.num_workers=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]
TINY_SYNTHETIC = [
    "dataset.n_train=4",
    "dataset.n_calibration=0",
    "dataset.n_test_good=2",
    "dataset.n_test_defect=3",
]
TINY_SYNTHETIC += [
    "dataset.generated_size=64",
    "dataset.image_size=64",
    "dataset.calibration_fraction=0.0",
]  # too few to calibrate


def fake_run(
    sweep: Path,
    name: str,
    *,
    method: str = "padim",
    category: str = "fabric",
    seed: int = 0,
    metrics: dict | None = None,
    error: str | None = None,
    overrides: tuple[str, ...] = (),
    dataset: str = "synthetic",
    backbone: str | None = "efficientnet_lite0",
    wandb: bool = False,
    status: str | None = None,
) -> Path:
    """A run dir as train() leaves it: its run.json."""
    run_dir = sweep / name
    record = RunRecord(
        method=method, backbone=backbone, dataset=dataset, category=category, seed=seed,
        status=status or ("failed" if error else "ok"), variant=list(overrides), metrics=metrics or {},
        error=error, wandb={"project": "anomaly", "offline": True} if wandb else None,
    )  # fmt: skip
    record.write(run_dir)
    return run_dir


def scores(image_auroc: float) -> dict[str, float]:
    return {"image_auroc": image_auroc, "pixel_auroc": 0.9, "pixel_aupro": 0.8, "image_f1_max": 0.7}


def table_rows(summary: str, metric: str) -> dict[str, list[str]]:
    """{first cell: cells} of one metric's table in summary.md (headed "## <key>: <label> ...")."""
    section = summary.split(f"## {metric}:")[1].split("\n## ")[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    return {cells[0].strip().strip("*"): [c.strip() for c in cells[1:]] for cells in rows}


def test_collector_rows_and_mean_row(tmp_path):
    fake_run(tmp_path, "a", category="fabric", metrics=scores(0.90))
    fake_run(tmp_path, "b", category="tile", metrics=scores(0.80))
    fake_run(tmp_path, "c", method="patchcore", category="fabric", metrics=scores(1.0))
    fake_run(tmp_path, "d", method="patchcore", category="tile", error="DataError: Cannot read image x.png")
    rows, _, _ = write_reports(tmp_path)

    with (tmp_path / "results.csv").open() as handle:
        results = {(r["method"], r["category"]): r for r in csv.DictReader(handle)}
    assert len(results) == 4 and len(rows) == 4
    assert (
        results["padim", "tile"]["status"] == "ok" and float(results["padim", "tile"]["image_auroc"]) == 0.8
    )
    assert results["patchcore", "tile"]["status"] == "failed"
    assert "Cannot read image x.png" in results["patchcore", "tile"]["error"]

    summary = (tmp_path / "summary.md").read_text()
    table = table_rows(summary, "image_auroc")
    assert table["fabric"] == ["90.0", "100.0"]
    assert table["tile"] == ["80.0", "failed"]
    assert table["mean"] == ["85.0", "– ⚠"]  # no fair mean over categories with a failure
    assert "4 runs, 1 failed" in summary and "Cannot read image x.png" in summary


def test_seeds_give_mean_and_std(tmp_path):
    for seed, (fabric, tile) in enumerate([(0.90, 0.80), (0.92, 0.84), (0.94, 0.88)]):
        fake_run(
            tmp_path,
            f"f{seed}",
            category="fabric",
            seed=seed,
            metrics=scores(fabric),
        )
        fake_run(
            tmp_path,
            f"t{seed}",
            category="tile",
            seed=seed,
            metrics=scores(tile),
        )
    write_reports(tmp_path)
    table = table_rows((tmp_path / "summary.md").read_text(), "image_auroc")
    assert table["fabric"] == ["92.0 ± 2.0"]
    assert table["tile"] == ["84.0 ± 4.0"]
    assert table["mean"] == ["88.0 ± 3.0"]  # per seed the mean over categories (85, 88, 91), then mean ± std


def test_swept_settings_are_not_averaged_as_seeds(tmp_path):
    """A coreset ratio sweep gives one column per ratio, not one column averaging the ratios."""
    for ratio, value in (("0.01", 0.8), ("0.1", 0.9)):
        overrides = (f"method.model.coreset_ratio={ratio}", "dataset.n_train=8")  # the record's variant
        fake_run(tmp_path, ratio, method="patchcore", metrics=scores(value), overrides=overrides)
    rows, _, _ = write_reports(tmp_path)
    assert sorted(r["variant"] for r in rows) == ["coreset_ratio=0.01", "coreset_ratio=0.1"]
    header = next(
        line for line in (tmp_path / "summary.md").read_text().splitlines() if line.startswith("| category")
    )
    assert "patchcore (efficientnet_lite0) [coreset_ratio=0.01]" in header and "n_train" not in header


def test_repeated_runs_count_once_and_killed_or_foreign_dirs_are_read_right(tmp_path):
    old = fake_run(tmp_path, "old_logger", metrics=scores(0.5))
    os.utime(old / "run.json", (1, 1))
    fake_run(tmp_path, "new_logger", metrics=scores(0.9))  # the same combination again, e.g. logger=wandb
    fake_run(tmp_path, "retried", category="tile", error="RuntimeError: retry failed")
    fake_run(tmp_path, "killed", category="grid", status="running")  # died before writing its result
    (tmp_path / "wandb" / "files").mkdir(parents=True)  # other tools' files are not runs
    (tmp_path / "wandb" / "files" / "config.yaml").write_text("method:\n  value: {name: padim}\n")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "run.json").write_text("{not json")

    rows, _, _ = write_reports(tmp_path)
    by_dir = {Path(r["run_dir"]).name: r for r in rows}
    assert set(by_dir) == {"new_logger", "retried", "killed"}
    assert by_dir["retried"]["status"] == "failed" and "retry failed" in by_dir["retried"]["error"]
    assert by_dir["killed"]["status"] == "failed" and "killed" in by_dir["killed"]["error"]
    assert "Ignored 1 older run(s)" in (tmp_path / "summary.md").read_text()


def test_a_method_without_a_backbone_is_labelled_without_one(tmp_path):
    fake_run(tmp_path, "a", method="efficientad", backbone=None, metrics=scores(0.9))
    rows, _, _ = write_reports(tmp_path)
    assert rows[0]["backbone"] == ""
    assert "| efficientad |" in (tmp_path / "summary.md").read_text()


def test_paper_numbers_only_beside_comparable_runs(tmp_path):
    for i, category in enumerate(MVTEC_CATEGORIES):
        fake_run(
            tmp_path / "all",
            f"wr50_{i}",
            category=category,
            dataset="mvtec",
            backbone="wide_resnet50_2",
            metrics={**scores(0.95), "pixel_auroc": 0.97},
        )
    summary = tmp_path / "all" / "summary.md"
    write_reports(tmp_path / "all")
    table = table_rows(summary.read_text(), "pixel_auroc")
    assert table["carpet"] == ["97.0", "99.1", "-2.1"]  # PaDiM-WR50-Rd550's published carpet value
    assert table["mean"] == ["97.0", "97.5", "-0.5"]  # all 15 categories ran: the paper's own mean
    assert table_rows(summary.read_text(), "image_auroc")["carpet"] == ["95.0", "–", "–"]  # only a mean
    assert "Defard et al." in summary.read_text()

    fake_run(
        tmp_path / "two",
        "a",
        category="bottle",
        dataset="mvtec",
        backbone="wide_resnet50_2",
        metrics=scores(1.0),
    )
    fake_run(
        tmp_path / "two",
        "b",
        category="cable",
        dataset="mvtec",
        backbone="wide_resnet50_2",
        metrics=scores(1.0),
    )
    write_reports(tmp_path / "two")
    assert table_rows((tmp_path / "two" / "summary.md").read_text(), "pixel_aupro")["mean"] == [
        "80.0",
        "91.8",
        "-11.8",
    ]

    fake_run(
        tmp_path / "lite", "a", category="bottle", dataset="mvtec", metrics=scores(1.0)
    )  # not the paper's backbone
    fake_run(tmp_path / "synthetic", "a", backbone="wide_resnet50_2", metrics=scores(1.0))  # not MVTec AD
    for sweep in ("lite", "synthetic"):
        write_reports(tmp_path / sweep)
        assert " paper " not in (tmp_path / sweep / "summary.md").read_text().split("Paper numbers")[0]


def test_summary_table_is_logged_to_wandb_offline(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_SILENT", "true")
    calls, real_init = [], wandb.init
    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs) or real_init(**kwargs))
    sweep = tmp_path / "my_sweep"
    fake_run(sweep, "a", metrics=scores(0.9), wandb=True)
    fake_run(sweep, "b", category="tile", error="DataError: broken", wandb=True)
    assert len(finish_sweep(sweep)) == 1
    assert calls[0]["group"] == "my_sweep" and calls[0]["mode"] == "offline"  # the group of the sweep's runs
    tables = list((sweep / "wandb").glob("offline-run-*/files/media/table/results_*.table.json"))
    assert len(tables) == 1, "no offline wandb run with the results table in the sweep dir"
    logged = json.loads(tables[0].read_text())
    assert len(logged["data"]) == 2 and "category" in logged["columns"]

    no_wandb = tmp_path / "csv_sweep"
    fake_run(no_wandb, "a", metrics=scores(0.9))
    finish_sweep(no_wandb)
    assert len(calls) == 1 and not (no_wandb / "wandb").exists()


def test_wandb_group_is_the_sweep_in_a_multirun():
    for mode, group in ((RunMode.MULTIRUN, "my_sweep"), (RunMode.RUN, "padim")):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            overrides = ["logger=wandb", "method=padim", "hydra.sweep.dir=/x/my_sweep"]
            cfg = compose("train", overrides, return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.mode = mode
        HydraConfig.instance().set_config(cfg)
        assert cfg.logger.wandb.group == group
        assert cfg.logger.wandb.job_type == "padim"
        assert (group == "my_sweep") == ("my_sweep" in cfg.logger.wandb.tags)


@pytest.mark.parametrize("search", ["padim_optuna", "patchcore_optuna"])
def test_searches_tune_on_their_own_generated_data_and_warn_on_mvtec(search, tmp_path):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", [f"hparams_search={search}"], return_hydra_config=True)
        mvtec = [
            f"hparams_search={search}",
            "dataset=mvtec",
            "dataset.root=/data",
            "~dataset.generation_seed",
        ]
        on_mvtec = compose(
            "train", mvtec, return_hydra_config=True
        )  # the recipe for held-out MVTec categories
    HydraConfig.instance().set_config(cfg)
    assert "Optuna" in cfg.hydra.sweeper._target_ and cfg.hydra.sweeper.direction == "maximize"
    for key in cfg.hydra.sweeper.params:  # every searched key exists in the method's config
        assert OmegaConf.select(cfg, key) is not None, key
    assert cfg.dataset.generation_seed == 1 and cfg.dataset.root.endswith("synthetic_search")
    assert search_notes(cfg, tmp_path) == []
    assert "WARNING" in search_notes(on_mvtec, tmp_path)[0]


# --- real multiruns --------------------------------------------------------------------------------------


def anomaly_train(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "anomaly.cli.train", "-m", *TINY_RUN, *overrides]
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> Path:
    """Generated once, before parallel jobs could both start generating it."""
    root = tmp_path_factory.mktemp("data") / "synthetic"
    return ensure_dataset(root, ["fabric"], n_train=4, n_test_good=2, n_test_defect=3, image_size=64, seed=0)


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory) -> Path:
    """Where the module's two benchmark sweeps start (each on its own data set): both append their runs to
    its outputs/runs.sqlite, which anomaly-report reads."""
    return tmp_path_factory.mktemp("benchmarks")


def synthetic_sweep_arguments(synthetic_root: Path, sweep: Path) -> list[str]:
    return ["experiment=benchmark_synthetic", "dataset.category=fabric", "seed=0,1", *TINY_SYNTHETIC,
            f"dataset.root={synthetic_root}", f"hydra.sweep.dir={sweep}"]  # fmt: skip


@pytest.fixture(scope="module")
def synthetic_sweep(benchmarks, synthetic_root) -> tuple[subprocess.CompletedProcess, Path]:
    """The generated benchmark over 2 seeds with the submitit launcher (jobs in their own processes):
    (its result, its sweep dir)."""
    sweep = benchmarks / "synthetic_sweep"
    launcher = ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"]
    return anomaly_train(benchmarks, *synthetic_sweep_arguments(synthetic_root, sweep), *launcher), sweep


def test_submitit_sweep_resumes_and_skips_finished_runs(synthetic_sweep, benchmarks, synthetic_root):
    """The benchmark experiment, first with the submitit launcher, then again: the second invocation finds
    every run finished and leaves the files alone."""
    first, sweep = synthetic_sweep
    args = synthetic_sweep_arguments(synthetic_root, sweep)
    assert first.returncode == 0, first.stdout + first.stderr
    assert (sweep / ".submitit").is_dir()
    metrics = sorted(sweep.glob("*/run.json"))
    assert len(metrics) == 2
    assert re.search(r"\| fabric \| \d+\.\d ± \d+\.\d \|", (sweep / "summary.md").read_text())
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in metrics}

    second = anomaly_train(benchmarks, *args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert (second.stdout + second.stderr).count("results for this exact config exist") == 2
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in metrics} == before
    assert len(list(csv.DictReader((sweep / "results.csv").open()))) == 2


def write_tiny_mvtec(root: Path) -> None:
    """Two categories in MVTec AD's layout; one of them has an unreadable test image."""
    rng = np.random.default_rng(0)
    for category in ("good_part", "corrupt_part"):
        folder = root / category
        for split, count, defect in (
            ("train/good", 4, False),
            ("test/good", 2, False),
            ("test/scratch", 2, True),
        ):
            (folder / split).mkdir(parents=True)
            for i in range(count):
                image = (rng.random((64, 64, 3)) * 60 + 100).astype(np.uint8)
                if defect:
                    image[20:30, 20:30] = 255
                    mask = np.zeros((64, 64), np.uint8)
                    mask[20:30, 20:30] = 255
                    (folder / "ground_truth" / "scratch").mkdir(parents=True, exist_ok=True)
                    Image.fromarray(mask).save(folder / "ground_truth" / "scratch" / f"{i:03d}_mask.png")
                Image.fromarray(image).save(folder / split / f"{i:03d}.png")
    (root / "corrupt_part" / "test" / "scratch" / "001.png").write_bytes(b"not a png")


@pytest.fixture(scope="module")
def failing_sweep(benchmarks) -> tuple[subprocess.CompletedProcess, Path]:
    """A joblib sweep (2 parallel jobs) over a good category, one with a corrupt image, one missing."""
    base = benchmarks
    write_tiny_mvtec(base / "mvtec")
    sweep = base / "sweep"
    result = anomaly_train(
        base,
        "dataset=mvtec",
        f"dataset.root={base / 'mvtec'}",
        "dataset.category=good_part,corrupt_part,missing_part",
        "dataset.image_size=64",
        "dataset.crop_size=null",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        f"hydra.sweep.dir={sweep}",
    )
    return result, sweep


def test_failures_are_isolated_reported_and_fail_the_command(failing_sweep):
    result, sweep = failing_sweep
    assert result.returncode != 0
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    rows = {r["category"]: r for r in csv.DictReader((sweep / "results.csv").open())}
    assert rows["good_part"]["status"] == "ok" and float(rows["good_part"]["image_auroc"]) > 0.5
    assert rows["corrupt_part"]["status"] == "failed" and "001.png" in rows["corrupt_part"]["error"]
    # found by the data check before any work: the record names the file and the fix
    assert rows["corrupt_part"]["error"].startswith("Data check of corrupt_part")
    assert "unreadable image (1)" in rows["corrupt_part"]["error"]
    assert rows["missing_part"]["status"] == "failed" and "missing_part" in rows["missing_part"]["error"]
    assert "Traceback" in (sweep / "1_padim_corrupt_part" / "error.log").read_text()
    assert "2 failed" in (sweep / "summary.md").read_text()
    threads = max(1, len(os.sched_getaffinity(0)) // 2)  # the cores, split between the 2 parallel jobs
    assert f"Torch CPU threads: {threads}" in (sweep / "0_padim_good_part" / "train.log").read_text()


class _Report(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.cells: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")

    def handle_data(self, data: str) -> None:
        self.cells.append(data)


def test_html_report_lists_runs_and_its_images_exist(failing_sweep):
    _, sweep = failing_sweep
    report = _Report()
    report.feed((sweep / "report.html").read_text())
    text = " ".join(report.cells)
    assert all(category in text for category in ("good_part", "corrupt_part", "missing_part"))
    assert "failed: Data check of corrupt_part" in text
    assert len(report.images) >= 5  # the metric plots and the good run's heatmaps
    assert all((sweep / unquote(src)).is_file() for src in report.images)


def test_html_report_renders_in_a_browser(failing_sweep, tmp_path, headless_browser):
    _, sweep = failing_sweep
    dom = headless_browser(sweep / "report.html", tmp_path)
    assert "good_part" in dom and "failed: Data check of corrupt_part" in dom
    pixels = np.asarray(Image.open(tmp_path / "screenshot.png").convert("L"), dtype=float)
    assert pixels.std() > 10, "the screenshot is blank"
    assert (pixels < 128).mean() > 0.005, "no text or images were drawn"


@pytest.fixture(scope="module")
def two_benchmarks(failing_sweep, synthetic_sweep, benchmarks) -> Path:
    """The MVTec-layout sweep and the generated one, started in one folder: both append to the same
    results database; returns the output root holding it."""
    synthetic, _ = synthetic_sweep
    assert synthetic.returncode == 0, synthetic.stdout + synthetic.stderr
    return benchmarks / "outputs"


def test_anomaly_report_puts_two_sweeps_on_two_data_sets_on_one_page(
    two_benchmarks, tmp_path, headless_browser
):
    assert main_report([str(two_benchmarks)]) == 0
    out = two_benchmarks / "report"
    assert {p.name for p in out.glob("*.md")} == {"mvtec.md", "synthetic.md", "overview.md"}
    overview = (out / "overview.md").read_text()
    assert "| method | mvtec | synthetic |" in overview
    # one row per method: each data set's own settings are not a variant; 2 of 3 MVTec-layout runs failed
    auroc = overview.split("## image_auroc")[1].split("##")[0]
    assert re.search(r"\| padim \(efficientnet_lite0\) \| \d+\.\d \(1/15\) ⚠ \| \d+\.\d ± \d+\.\d \|", auroc)
    assert "good_part" in (out / "mvtec.md").read_text() and "fabric" in (out / "synthetic.md").read_text()
    report = _Report()
    report.feed((out / "index.html").read_text())
    assert all((out / unquote(src)).is_file() for src in report.images) and len(report.images) >= 6
    dom = headless_browser(out / "index.html", tmp_path)
    for text in ("Results across benchmarks", 'id="mvtec"', 'id="synthetic"', "good_part", "fabric"):
        assert text in dom, text
    pixels = np.asarray(Image.open(tmp_path / "screenshot.png").convert("L"), dtype=float)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005, "nothing was drawn"


def test_optuna_search_runs_trials_and_reports_the_best(tmp_path):
    sweep = tmp_path / "search"
    result = anomaly_train(
        tmp_path,
        "hparams_search=padim_optuna",
        "hydra.sweeper.n_trials=2",
        *TINY_SYNTHETIC,
        f"dataset.root={tmp_path / 'search_data'}",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert 0.0 <= best["best_value"] <= 1.0 and set(best["best_params"]) == {
        "method.model.n_features",
        "method.model.covariance_epsilon",
        "method.model.blur_sigma",
    }
    rows = list(csv.DictReader((sweep / "results.csv").open()))
    assert len(rows) == 2 and rows[0]["variant"] != rows[1]["variant"]
    assert all(r["status"] == "ok" and r["dataset"] == "synthetic" for r in rows)
    assert "Optuna best pixel_aupro" in (sweep / "summary.md").read_text()
    generated = json.loads(next((tmp_path / "search_data").glob("*/.complete")).read_text())
    assert generated["seed"] == 1  # tuned on its own generated images, not the benchmark's


def test_results_database_keeps_one_row_per_run_dir_newest_last(tmp_path):
    database = tmp_path / "outputs" / "runs.sqlite"
    first = RunRecord("padim", "resnet18", "mvtec", "bottle", 0, "failed", error="out of memory")
    append_run(database, first, tmp_path / "a")
    append_run(database, RunRecord("patchcore", "resnet18", "visa", "candle", 0, "ok"), tmp_path / "b")
    append_run(
        database,
        RunRecord("padim", "resnet18", "mvtec", "bottle", 0, "ok", metrics={"x": 1.0}),
        tmp_path / "a",
    )
    runs = read_runs(database)
    assert [(record.method, record.status, run_dir.name) for record, run_dir in runs] == [
        ("patchcore", "ok", "b"), ("padim", "ok", "a"),
    ]  # fmt: skip
    assert runs[1][0].metrics == {"x": 1.0}


def test_anomaly_report_without_a_database_names_the_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main_report([str(tmp_path)])
    assert f"No results database at {tmp_path / 'runs.sqlite'}" in capsys.readouterr().err
