"""What a sweep costs with and without the feature cache (issue 30's figures).

Runs, each ``anomaly-train`` a process of its own and timed whole (imports included):

1. one run of the config with ``cache=false`` (the reference: one full run);
2. the sweep (Hydra's basic launcher: one process, runs one after another) with ``cache=false``
   (``--skip-uncached-sweep`` leaves it out);
3. the same sweep with ``cache=true`` in a new, empty cache folder;

and prints their wall and CPU times, the sweep/one-run ratios, the backbone passes per image (images the
backbone computed, from each run's ``run.json``, over the distinct images the sweep fed it: one cache file
each; the splits hold different images, so this is per image and split), the cache's disk size per image,
and the metrics of the two sweeps side by side (they must be equal). The sweep is ``--seeds N``
(``seed=0,...,N-1``) beside ``--methods``, or any Hydra sweep given with ``--sweep`` (repeatable), e.g. the
few-shot curve. With ``--simplenet-epochs E`` it times SimpleNet's fit at 1 and E epochs with and without
the cache: the time per epoch after the first is (fit(E) - fit(1)) / (E - 1).

The issue's targets, on an idle machine (MVTec AD ``bottle``, 256 px; ``BOTTLE`` below):

    # PaDiM, 5 seeds: the cached sweep at most 1.5x one run
    python scripts/benchmark_sweep.py --seeds 5 -- $BOTTLE method=padim
    # PaDiM and PatchCore, 3 seeds: 1 backbone pass per image and split
    python scripts/benchmark_sweep.py --seeds 3 --methods padim,patchcore -- $BOTTLE
    # SimpleNet, 20 epochs: a later epoch with the cache at most 40 % of one without
    python scripts/benchmark_sweep.py --seeds 0 --simplenet-epochs 20 -- $BOTTLE
    # the few-shot curve: the cached sweep at most 3x one full-data run
    python scripts/benchmark_sweep.py --sweep dataset.shots=1,2,4,8,16 --sweep dataset.shot_draw=0,1,2 \\
        -- $BOTTLE method=padim

where BOTTLE="dataset=mvtec dataset.root=../shared/data/mvtec_ad dataset.category=bottle
dataset.image_size=[256,256] dataset.crop_size=null dataset.num_workers=0".
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


def sweep_overrides(args: argparse.Namespace) -> list[str]:
    """The swept values: ``--sweep`` as given, else the seeds (and the methods beside them)."""
    if args.sweep:
        return list(args.sweep)
    methods = [f"method={args.methods}"] if args.methods else []
    return [*methods, f"seed={','.join(str(seed) for seed in range(args.seeds))}"]


def sweep_figures(args: argparse.Namespace, out: Path) -> None:
    swept = sweep_overrides(args)
    cache_dir = out / "cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    for folder in ("one", "uncached", "cached"):
        shutil.rmtree(out / folder, ignore_errors=True)
    rows = {"one run, cache=false": train([*args.overrides, "cache=false", f"hydra.run.dir={out / 'one'}"],
                                          multirun=False)}  # fmt: skip
    common = [*args.overrides, *swept, f"paths.cache_dir={cache_dir}"]
    if not args.skip_uncached_sweep:
        sweep = [*common, "cache=false", f"hydra.sweep.dir={out / 'uncached'}"]
        rows["sweep, cache=false"] = train(sweep, multirun=True)
    sweep = [*common, "cache=true", f"hydra.sweep.dir={out / 'cached'}"]
    rows["sweep, cache=true (empty cache at the start)"] = train(sweep, multirun=True)

    runs_cached = records(out / "cached")
    computed = sum(record["feature_cache"]["images_computed"] for record in runs_cached)
    read = sum(record["feature_cache"]["images_read"] for record in runs_cached)
    files = list(cache_dir.glob("*/*.safetensors"))
    size = sum(path.stat().st_size for path in files)
    one_wall, one_cpu = rows["one run, cache=false"]
    print(f"\n{len(runs_cached)} runs in the sweep ({' '.join(swept)}); config: {' '.join(args.overrides)}")
    print("| what | wall s | x one run | CPU s | x one run |\n|---|---:|---:|---:|---:|")
    for what, (wall, cpu) in rows.items():
        print(f"| {what} | {wall:.1f} | {wall / one_wall:.2f} | {cpu:.1f} | {cpu / one_cpu:.2f} |")
    if files:
        print(f"backbone passes per image and split: {computed / len(files):.2f} with the cache ({computed} "
              f"computed, {read} read, {len(files)} distinct images), {(computed + read) / len(files):.2f} "
              "without")  # fmt: skip
        print(f"cache: {len(files)} images, {size / 1e6:.1f} MB, {size / len(files) / 1e6:.3f} MB per image")
    if not args.skip_uncached_sweep:
        runs_uncached = records(out / "uncached")
        pairs = list(zip(runs_uncached, runs_cached, strict=True))
        same = [quality(a) == quality(b) for a, b in pairs]
        print(f"metrics of the cached sweep equal the uncached sweep's, run by run: {all(same)} ({same})")
        gaps = [(abs(value - quality(b)[key]) / max(abs(value), 1e-12), key, run)
                for run, (a, b) in enumerate(pairs) for key, value in quality(a).items()]  # fmt: skip
        gap, key, run = max(gaps)
        print(f"largest relative difference: {gap:.2g} ({key}, run {run}; features that another batch "
              "computed round differently: docs/performance.md, Feature cache)")  # fmt: skip


def simplenet_figures(args: argparse.Namespace, out: Path) -> None:
    epochs = args.simplenet_epochs
    fit_seconds = {}
    for cache in ("false", "true"):
        for count in (1, epochs):
            cache_dir = out / f"simplenet-cache-{count}"
            shutil.rmtree(cache_dir, ignore_errors=True)
            run_dir = out / f"simplenet-{cache}-{count}"
            train([*args.overrides, "method=simplenet", f"method.max_epochs={count}", f"cache={cache}",
                   f"paths.cache_dir={cache_dir}", f"hydra.run.dir={run_dir}"], multirun=False)  # fmt: skip
            fit_seconds[cache, count] = json.loads((run_dir / "metrics.json").read_text())["fit_seconds"]
    per_epoch = {cache: (fit_seconds[cache, epochs] - fit_seconds[cache, 1]) / (epochs - 1)
                 for cache in ("false", "true")}  # fmt: skip
    print(f"\nSimpleNet, {epochs} epochs: fit s (1 epoch / {epochs} epochs) and s per epoch after the first")
    print("| cache | fit 1 | fit E | per later epoch |\n|---|---:|---:|---:|")
    for cache in ("false", "true"):
        print(f"| {cache} | {fit_seconds[cache, 1]:.1f} | {fit_seconds[cache, epochs]:.1f} | "
              f"{per_epoch[cache]:.2f} |")  # fmt: skip
    print(f"a later epoch with the cache takes {100 * per_epoch['true'] / per_epoch['false']:.0f} % of one "
          "without")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=5, help="seeds of the sweep (0: no sweep)")
    parser.add_argument("--methods", default="", help="e.g. padim,patchcore: swept beside the seeds")
    parser.add_argument("--sweep", action="append", default=[],
                        help="a Hydra sweep override in place of the seeds, e.g. dataset.shots=1,2,4 "
                             "(repeatable: the sweep is their product)")  # fmt: skip
    parser.add_argument("--skip-uncached-sweep", action="store_true",
                        help="time the cached sweep against one run only")  # fmt: skip
    parser.add_argument("--simplenet-epochs", type=int, default=0, help="also time SimpleNet's epochs (>= 2)")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmark_sweep"))
    parser.add_argument("overrides", nargs="*", help="anomaly-train overrides (after --)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.seeds or args.sweep:
        sweep_figures(args, args.out.absolute())
    if args.simplenet_epochs >= 2:
        simplenet_figures(args, args.out.absolute())


if __name__ == "__main__":
    main()
