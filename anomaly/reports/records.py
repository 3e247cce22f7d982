"""One typed record per run (``run.json``), written by ``anomaly-train`` on success and on failure.

Everything that reports on runs (sweep tables, plots, HTML, wandb, ``anomaly-report``) reads these
records and nothing else of a run dir: no config parsing, no ``_target_`` strings.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from uuid import uuid4

RECORD_FILE = "run.json"


@dataclass
class RunRecord:
    method: str  # the method's name (configs/method)
    backbone: str | None  # the backbone's name, None for a method without one (EfficientAD)
    dataset: str  # the data set config (mvtec, folder, synthetic, ...)
    category: str  # the category (a unified run's: joined by "+", or "all"), or the data folder's name
    seed: int
    status: str  # "ok" or "failed"
    variant: list[str] = field(default_factory=list)  # the run's command-line settings beyond the table axes
    metrics: dict[str, float] = field(default_factory=dict)  # a unified run's: the mean over its categories
    timings: dict[str, float] = field(default_factory=dict)  # fit_seconds, test_seconds, peak_rss_mb
    error: str | None = None  # the failure, one line
    skipped_files: list[str] = field(default_factory=list)  # left out by dataset.on_bad_file=skip
    sample_images: list[str] = field(default_factory=list)  # test images of the heatmaps (export's parity)
    calibration: dict | None = None  # the thresholds and their guarantees (Calibration.summary())
    feature_cache: dict | None = None  # the backbone feature cache's images_read, images_computed; None: off
    wandb: dict | None = None  # the run's wandb logger settings (project, offline) for the sweep's summary
    # how the run is fitted and evaluated: "per-category" (one model on all of a category's normal images),
    # "few-shot" (on dataset.shots of them); the reports show each protocol apart
    protocol: str = "per-category"
    shots: int | None = None  # few-shot: k, the normal training images it fitted on
    shot_draw: int | None = None  # few-shot: which draw of the k images (dataset.shot_draw)
    shot_files: list[str] = field(default_factory=list)  # few-shot: the k drawn images
    threshold_note: str | None = None  # why the run has no threshold (None: it has one, or it failed first)
    # the run's own id, its key in the results database (a run dir can hold a later run: force=true)
    run_id: str = field(default_factory=lambda: uuid4().hex)
    protocol: str = "per-category"  # "per-category": a model per category; "unified": one for several
    category_metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # unified: each category's

    def write(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RECORD_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, run_dir: Path) -> "RunRecord | None":
        """The record of ``run_dir``, None when there is none (or it is not one of ours)."""
        path = run_dir / RECORD_FILE
        if not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (TypeError, ValueError):
            return None
