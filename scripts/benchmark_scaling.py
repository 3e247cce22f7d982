"""How fit time, test time and peak memory grow with the training set, on 1 and on N processes.

Fits PaDiM and PatchCore (EfficientNet-Lite0, 256 px) on generated categories of growing size with
``anomaly-train`` (each run its own process, so peak memory is the run's own), with a fixed test set of 40
images, no threshold (the calibration cost is not what is measured), and prints a table; writes
``scaling.csv`` and ``scaling.png`` (log-log curves) into ``--out``. Peak memory is rank 0's (each rank
of a distributed run holds its own share of the features plus the model).

    python scripts/benchmark_scaling.py --sizes 50 200 800 3200 --processes 1 2
"""

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

FIELDS = ("method", "train_images", "processes", "fit_seconds", "test_seconds", "peak_rss_mb", "wall_seconds")


def run(method: str, size: int, processes: int, out: Path) -> dict:
    """One anomaly-train run; its figures from metrics.json."""
    run_dir = out / "runs" / f"{method}-{size}-{processes}"
    arguments = [
        "logger=none", "trainer.enable_progress_bar=false", "paths.results_db=null", "threshold.source=none",
        f"method={method}", f"dataset.n_train={size}", "dataset.n_calibration=0",
        "dataset.n_test_good=20", "dataset.n_test_defect=20",
        "dataset.calibration_fraction=0", "dataset.image_size=256", "dataset.crop_size=null",
        "dataset.num_workers=0",
        f"paths.data_dir={out / 'data'}", f"hydra.run.dir={run_dir}", "force=true", "trainer.accelerator=cpu",
        *(["trainer=ddp", f"trainer.devices={processes}"] if processes > 1 else []),
    ]  # fmt: skip
    start = time.perf_counter()
    command = [sys.executable, "-m", "anomaly.cli.train", *arguments]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        where = f"{method} at {size} images on {processes} process(es)"
        raise SystemExit(f"{where} failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "method": method, "train_images": size, "processes": processes,
        "fit_seconds": metrics["fit_seconds"], "test_seconds": metrics["test_seconds"],
        "peak_rss_mb": metrics["peak_rss_mb"], "wall_seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    """Fit time and peak memory against training images, one line per method and process count."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, axis, label in (("fit_seconds", axes[0], "fit (s)"), ("peak_rss_mb", axes[1], "peak RSS (MB)")):
        for method, processes in sorted({(r["method"], r["processes"]) for r in rows}):
            line = [r for r in rows if (r["method"], r["processes"]) == (method, processes)]
            axis.plot([r["train_images"] for r in line], [r[key] for r in line], "o-",
                      label=f"{method}, {processes} process(es)")  # fmt: skip
        axis.set(xscale="log", yscale="log", xlabel="training images", ylabel=label)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 200, 800, 3200])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--methods", nargs="+", default=["padim", "patchcore"])
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmark_scaling"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    print(" | ".join(FIELDS))
    for method in args.methods:
        for size in args.sizes:
            for processes in args.processes:
                rows.append(run(method, size, processes, args.out.resolve()))
                print(" | ".join(str(rows[-1][key]) for key in FIELDS), flush=True)
    with (args.out / "scaling.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out / "scaling.png")
    print(f"wrote {args.out / 'scaling.csv'} and {args.out / 'scaling.png'}")


if __name__ == "__main__":
    main()
