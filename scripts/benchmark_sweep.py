"""What a sweep costs with and without the backbone feature cache (issue 30's figures).

Runs, each ``anomaly-train`` a process of its own and timed whole (imports included):

1. one run of the config with ``cache=false``;
2. the seed sweep (``-m seed=0,...``, Hydra's basic launcher: one process, runs one after another) with
   ``cache=false``;
3. the same sweep with ``cache=true`` in a new, empty cache folder;

and prints their wall times, the sweep/one-run ratios and the backbone passes per image (images the
backbone computed, from each run's ``run.json``, over the images the runs read), the disk size of the
cache per image, and the metrics of the two sweeps side by side (they must be equal). With
``--simplenet-epochs E`` it also times SimpleNet's fit at 1 and E epochs with and without the cache: the
time per epoch after the first is (fit(E) − fit(1)) / (E − 1).

    python scripts/benchmark_sweep.py --seeds 5 -- dataset=mvtec dataset.root=../shared/data/mvtec_ad \\
        dataset.category=bottle method=padim
    python scripts/benchmark_sweep.py --seeds 3 --methods padim,patchcore -- dataset=mvtec ...
    python scripts/benchmark_sweep.py --seeds 0 --simplenet-epochs 20 -- dataset=mvtec ...
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

FIXED = ["logger=none", "trainer.enable_progress_bar=false", "paths.results_db=null", "force=true"]
TIMINGS = ("fit_seconds", "calibration_seconds", "test_seconds", "peak_rss_mb")


def train(arguments: list[str], multirun: bool) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, the process and its children) of one anomaly-train
    process: on a shared machine the CPU seconds are the steadier figure."""
    command = [sys.executable, "-m", "anomaly.cli.train", *(["-m"] if multirun else []), *FIXED, *arguments]
    cpu_before, start = cpu_seconds(), time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start, cpu_seconds() - cpu_before


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def records(folder: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(folder.glob("**/run.json"))]


def quality(record: dict) -> dict:
    return {key: value for key, value in record["metrics"].items() if key not in TIMINGS}


def sweep_figures(args: argparse.Namespace, out: Path) -> None:
    seeds = ",".join(str(seed) for seed in range(args.seeds))
    methods = [f"method={args.methods}"] if args.methods else []
    cache_dir = out / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    one = train([*args.overrides, "cache=false", f"hydra.run.dir={out / 'one'}"], multirun=False)
    common = [*args.overrides, *methods, f"seed={seeds}", f"paths.cache_dir={cache_dir}"]
    uncached = train([*common, "cache=false", f"hydra.sweep.dir={out / 'uncached'}"], multirun=True)
    cached = train([*common, "cache=true", f"hydra.sweep.dir={out / 'cached'}"], multirun=True)
    runs_uncached, runs_cached = records(out / "uncached"), records(out / "cached")
    computed = sum(record["feature_cache"]["images_computed"] for record in runs_cached)
    read = sum(record["feature_cache"]["images_read"] for record in runs_cached)
    per_run = (computed + read) / len(runs_cached)  # backbone inputs per run (fit, calibration, test)
    files = list(cache_dir.glob("*/*.safetensors"))
    size = sum(path.stat().st_size for path in files)
    print(f"\nruns per sweep: {len(runs_cached)}; config: {' '.join(args.overrides)} {' '.join(methods)}")
    print("| what | wall s | × one run | CPU s | × one run |\n|---|---:|---:|---:|---:|")
    for what, (wall, cpu) in (("one run, cache=false", one), ("sweep, cache=false", uncached),
                              ("sweep, cache=true (cold cache)", cached)):  # fmt: skip
        print(f"| {what} | {wall:.1f} | {wall / one[0]:.2f} | {cpu:.1f} | {cpu / one[1]:.2f} |")
    without = round(per_run * len(runs_cached))
    print(f"images through the backbone: {computed} with the cache, {without} without (each run passes "
          f"{per_run:.0f} images through it: fit, calibration, test)")  # fmt: skip
    if files:
        print(f"cache: {len(files)} images, {size / 1e6:.1f} MB, {size / len(files) / 1e6:.3f} MB per image")
    same = [quality(a) == quality(b) for a, b in zip(runs_uncached, runs_cached, strict=True)]
    print(f"metrics of the cached sweep equal the uncached sweep's, run by run: {all(same)} ({same})")


def simplenet_figures(args: argparse.Namespace, out: Path) -> None:
    epochs = args.simplenet_epochs
    rows = {}
    for cache in ("false", "true"):
        for count in (1, epochs):
            cache_dir = out / f"simplenet-cache-{count}"
            shutil.rmtree(cache_dir, ignore_errors=True)
            run_dir = out / f"simplenet-{cache}-{count}"
            train([*args.overrides, "method=simplenet", f"method.max_epochs={count}", f"cache={cache}",
                   f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}"], multirun=False)  # fmt: skip
            rows[cache, count] = json.loads((run_dir / "metrics.json").read_text())["fit_seconds"]
    print(f"\nSimpleNet, {epochs} epochs: fit s (1 epoch / {epochs} epochs) and s per epoch after the first")
    print("| cache | fit 1 | fit E | per later epoch |\n|---|---:|---:|---:|")
    for cache in ("false", "true"):
        per_epoch = (rows[cache, epochs] - rows[cache, 1]) / (epochs - 1)
        print(f"| {cache} | {rows[cache, 1]:.1f} | {rows[cache, epochs]:.1f} | {per_epoch:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=5, help="seeds of the sweep (0: no sweep)")
    parser.add_argument("--methods", default="", help="e.g. padim,patchcore: swept beside the seeds")
    parser.add_argument("--simplenet-epochs", type=int, default=0, help="also time SimpleNet's epochs (>= 2)")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmark_sweep"))
    parser.add_argument("overrides", nargs="*", help="anomaly-train overrides (after --)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.seeds:
        sweep_figures(args, args.out.absolute())
    if args.simplenet_epochs >= 2:
        simplenet_figures(args, args.out.absolute())


if __name__ == "__main__":
    main()
