"""Shared fixtures: a tiny random backbone, smooth test images with a pasted defect, small training runs.

Helpers are fixtures (a fixture may return a function), never imported from this file.
"""

import importlib
import logging
import os
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict
from torch import Tensor, nn

import anomaly
from anomaly.backbones import FeatureExtractor
from anomaly.backbones.feature_cache import FrozenNetwork
from anomaly.calibration import fit_calibration
from anomaly.data.preprocessing import Preprocessing
from anomaly.methods.padim.model import Padim
from anomaly.metrics import Evaluator
from anomaly.model_io import save_model

IMAGE_SIZE = 64  # side of the smooth test images
SQUARE = (slice(20, 40), slice(24, 44))  # rows, columns of the pasted defect


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (README: ``-n 2``) each worker, and every process a test starts, computes on one
    thread: two workers then fill the two cores without oversubscribing them (4 OpenMP threads on 2 cores
    spin and run several times slower)."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


class TinyBackbone(FrozenNetwork):
    """Three frozen random conv stages at strides 4/8/16 (8/12/16 channels); ``layers`` picks outputs."""

    STRIDES, CHANNELS = {"stage1": 4, "stage2": 8, "stage3": 16}, {"stage1": 8, "stage2": 12, "stage3": 16}

    def __init__(self, layers: Sequence[str] = ("stage1", "stage2", "stage3")) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stage1 = nn.Sequential(nn.Conv2d(3, 8, 3, 4, 1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 12, 3, 2, 1), nn.ReLU())
        self.stage3 = nn.Sequential(nn.Conv2d(12, 16, 3, 2, 1), nn.ReLU())
        self.layers = list(layers)
        self.channels = [self.CHANNELS[layer] for layer in self.layers]
        self.strides = [self.STRIDES[layer] for layer in self.layers]
        self.requires_grad_(False)

    def compute(self, images: Tensor) -> dict[str, Tensor]:
        f1 = self.stage1(images)
        f2 = self.stage2(f1)
        outputs = {"stage1": f1, "stage2": f2, "stage3": self.stage3(f2)}
        return {layer: outputs[layer] for layer in self.layers}


@pytest.fixture(scope="session")
def tiny_backbone() -> Callable[..., TinyBackbone]:
    """``tiny_backbone(layers=...)``: a new TinyBackbone (same random weights every time)."""
    return TinyBackbone


@pytest.fixture(scope="session")
def smooth_images() -> Callable[[int, int], Tensor]:
    """``smooth_images(count, seed)``: ``[count, 3, 64, 64]`` smooth noise in [0.3, 0.7], the "normal"
    texture of the method tests."""

    def make(count: int, seed: int) -> Tensor:
        coarse = torch.rand(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
        smooth = F.interpolate(coarse, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        return 0.3 + 0.4 * smooth

    return make


@pytest.fixture(scope="session")
def defect_square() -> tuple[slice, slice]:
    """(rows, columns) where :func:`with_square` pastes its defect."""
    return SQUARE


@pytest.fixture(scope="session")
def with_square() -> Callable[[Tensor], Tensor]:
    """``with_square(images)``: the images with a bright square pasted at ``defect_square``: a defect the
    models never saw."""

    def paste(images: Tensor) -> Tensor:
        defective = images.clone()
        defective[:, :, SQUARE[0], SQUARE[1]] = 1.0
        return defective

    return paste


SMALL_DATA = [
    "dataset.n_train=16",
    "dataset.n_calibration=0",
    "dataset.n_test_good=8",
    "dataset.n_test_defect=12",
    "dataset.generated_size=128",
    "dataset.image_size=128",
    "dataset.num_workers=0",
    "dataset.batch_size=8",
    "trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="session")
def small_data_overrides() -> list[str]:
    """Overrides for small generated data (16 train, 20 test images at 128 px), no progress bars."""
    return list(SMALL_DATA)


@pytest.fixture(scope="session")
def run_job() -> Callable[[Path, list[str]], tuple[dict, Path]]:
    """``run_job(tmp_path, overrides, method=None)``: :func:`anomaly.run` of the config anomaly-train composes
    from these overrides (and a method config of the test's own), in ``tmp_path/run``; returns (metrics,
    run dir)."""

    def run(tmp_path: Path, overrides: list[str], method: dict | None = None) -> tuple[dict, Path]:
        output_dir = tmp_path / "run"
        cfg = anomaly.compose(overrides, output_dir=output_dir)
        with open_dict(cfg):
            cfg.paths.data_dir = str(tmp_path.parent / "shared-data")
            cfg.paths.results_db = str(tmp_path / "runs.sqlite")
            cfg.paths.cache_dir = str(tmp_path / "feature_cache")  # each test its own feature cache
            if method is not None:  # a method config of the test's own, in place of configs/method/
                cfg.method = method
        return anomaly.run(cfg).metrics, output_dir

    return run


@pytest.fixture(scope="session")
def run_training(run_job) -> Callable[[Path, list[str]], tuple[dict, Path]]:
    """``run_training(tmp_path, overrides)``: anomaly-train's job on small generated data (generated once
    per test session folder); returns (metrics, run dir)."""
    return lambda tmp_path, overrides, method=None: run_job(tmp_path, [*SMALL_DATA, *overrides], method)


@pytest.fixture(scope="session")
def padim_file(tmp_path_factory) -> Path:
    """A fitted PaDiM model file (random-init ResNet18 layer1+2, 64 px, 20 channels) with a calibration of
    60 scores, as anomaly-train writes it: for tests of loading, predict and update (seconds)."""
    path = tmp_path_factory.mktemp("padim") / "model.safetensors"
    backbone = {"name": "resnet18", "layers": ["layer1", "layer2"], "weights": None, "fold_batch_norms": True}
    with pytest.warns(UserWarning, match="randomly initialised"):
        model = Padim(FeatureExtractor(**backbone), n_features=20, seed=3)
    model.collect(torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    model.fit()
    scores = torch.linspace(1.0, 2.0, 60)
    calibration = fit_calibration(scores, scores + 1, 0.05, 0.05, 0.9, source="held-out split")
    config = {"n_features": 20, "seed": 3, "backbone": backbone}
    save_model(model, "padim", config, Preprocessing([64, 64], None), path, calibration)
    return path


@pytest.fixture(scope="session")
def score_test_set() -> Callable:
    """``score_test_set(model, data)``: metrics of ``model`` on the test split of a set-up data module,
    computed like the test loop."""

    @torch.no_grad()
    def score(model: nn.Module, data) -> dict[str, float]:
        evaluator = Evaluator()
        for batch in data.test_dataloader():
            out = model(batch["image"])
            evaluator.update(out.image_score, batch["label"], out.anomaly_map, batch["mask"])
        return evaluator.compute()

    return score


@pytest.fixture(scope="session")
def headless_browser() -> Callable[[Path, Path], str]:
    """``headless_browser(page, work_dir)``: Chromium renders ``page`` from disk; returns the rendered DOM and
    leaves a screenshot at ``work_dir/screenshot.png``. Skips where Chromium is not installed (.ci/run
    installs it)."""
    if not shutil.which("chromium"):
        pytest.skip("chromium is not installed")

    def render(page: Path, work_dir: Path) -> str:
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 f"--user-data-dir={work_dir / 'profile'}", "--window-size=1200,900"]  # fmt: skip
        run = ["chromium", *flags]
        subprocess.run([*run, f"--screenshot={work_dir / 'screenshot.png'}", page.as_uri()],
                       capture_output=True, timeout=120, check=True)  # fmt: skip
        dom = subprocess.run([*run, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
        return dom.stdout

    return render


@pytest.fixture
def command_in_process(monkeypatch, capsys) -> Callable[..., subprocess.CompletedProcess]:
    """``command_in_process(module, *arguments, cwd=..., full_error=False)``: the result of
    ``python -m anomaly.cli.<module> <arguments>`` (train, check_data, predict, update) in ``cwd``, from the
    command's ``main()`` called in this process as that runs it: argv, working folder, exit status, stdout and
    stderr, an exception that escapes printed as the interpreter prints it; without an interpreter to start
    (its imports: ~10 s on 2 busy cores). For the many cases of a command's one-block errors; each command
    also runs as a process (tests/end_to_end/test_errors.py, test_file_system_errors_cli.py)."""

    def run(module: str, *arguments: str, cwd: Path, full_error: bool = False) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
        if full_error:
            monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
        argv = [f"anomaly-{module}", *arguments, "reuse_freed_memory=false"]  # malloc: the process's own
        monkeypatch.setattr(sys, "argv", argv)
        main = importlib.import_module(f"anomaly.cli.{module}").main
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level  # Hydra's job logging replaces them
        capsys.readouterr()
        try:
            main()
            returncode = 0
        except SystemExit as exit_info:
            returncode = exit_info.code if isinstance(exit_info.code, int) else 1
        except Exception:
            traceback.print_exc()
            returncode = 1
        finally:
            for handler in root.handlers:
                if handler not in handlers:
                    handler.close()
            root.handlers[:], root.level = handlers, level
        out = capsys.readouterr()
        return subprocess.CompletedProcess(argv, returncode, out.out, out.err)

    return run
