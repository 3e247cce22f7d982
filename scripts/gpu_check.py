"""The GPU checks and benchmarks in one go, for a machine with a CUDA GPU and no network; one table out.

    python scripts/gpu_check.py --json gpu_check.json            # on the GPU machine (~8 min on an H200)
    python scripts/gpu_check.py --device cpu --quick             # rehearsal on a CPU: every step, tiny
                                                                   # sizes, ResNet18 instead of WideResNet50

1. ``pytest -m gpu``: CPU-vs-GPU metric agreement, the float32 greedy selection, EfficientAD, distillation,
   predict and export on CUDA (tests/gpu/test_gpu.py).
2. Greedy coreset at PatchCore's large case (N = 1,536,000 projected patches, 128-d, float16, 10 %):
   seconds, steps per second and the memory-bandwidth floor (one full read of the points per step, at the
   bandwidth a plain reduction reaches on this GPU); the coverage radius against a float32 run.
3. The papers' setting at MVTec AD's size, on generated data (random-init WideResNet50: timings only, its
   metrics mean nothing and are not shown): 256 px resized, 224 crop, ~240 training and ~110 test images
   per category; PatchCore (layer2+3, 1024/1024, 10 %) and PaDiM (layer1-3, d = 550) fit + test per
   category over 15 categories (3 generated categories × 5 seeds stand in for MVTec AD's 15), the stage
   split of one category and the GPU memory peak.
4. The default job (PatchCore, Lite0, generated fabric) on the GPU and on the CPU.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anomaly.data.synthetic import BENCHMARK_CATEGORIES, ensure_dataset  # noqa: E402
from anomaly.methods.patchcore.coreset import greedy_k_center  # noqa: E402


def environment(device: str) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def gpu_tests(device: str) -> dict:
    if device != "cuda":
        return {"gpu_tests": "skipped (no CUDA)"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu/test_gpu.py"],
                            cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    print(result.stdout[-3000:], result.stderr[-2000:], flush=True)
    return {
        "gpu_tests": result.stdout.strip().splitlines()[-1] if result.stdout else f"exit {result.returncode}"
    }


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def read_bandwidth(points: torch.Tensor, device: str, repeats: int = 20) -> float:
    """Bytes per second of one full read of ``points`` (a matrix-vector product, as one greedy step)."""
    vector = points[0].clone()
    torch.mv(points, vector)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mv(points, vector)
    synchronize(device)
    return repeats * points.numel() * points.element_size() / (time.perf_counter() - start)


def coreset_benchmark(device: str, num_points: int) -> dict:
    generator = torch.Generator(device=device).manual_seed(0)
    centres = torch.randn(2000, 128, device=device, generator=generator) * 4
    labels = torch.randint(0, 2000, (num_points,), device=device, generator=generator)
    points = (centres[labels] + torch.randn(num_points, 128, device=device, generator=generator)).half()
    count = num_points // 10
    starts = torch.arange(10, device=device)
    floor_seconds = count * points.numel() * points.element_size() / read_bandwidth(points, device)
    greedy_k_center(points[:20000], 200, starts)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    selected = greedy_k_center(points, count, starts)
    synchronize(device)
    seconds = time.perf_counter() - start
    exact = greedy_k_center(points.float(), count, starts)
    radius = {
        name: float(torch.cdist(points.float(), points[s].float()).amin(dim=1).max())
        if num_points <= 20000 else float(nearest_distance_max(points.float(), points[s].float()))
        for name, s in (("float16", selected), ("float32", exact))
    }  # fmt: skip
    return {
        "coreset_points": num_points, "coreset_steps": count, "coreset_s": round(seconds, 1),
        "coreset_steps_per_s": round(count / seconds), "coreset_floor_s": round(floor_seconds, 1),
        "coreset_vs_floor": round(seconds / floor_seconds, 2),
        "coverage_radius_change": round(radius["float16"] / radius["float32"] - 1, 5),
    }  # fmt: skip


def nearest_distance_max(points: torch.Tensor, bank: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """max over points of the distance to the nearest bank row, in chunks (no N × M matrix)."""
    return max(torch.cdist(part, bank).amin(dim=1).max() for part in points.split(chunk))


def train_command(device: str, overrides: list[str], sweep_dir: Path | None = None) -> list[str]:
    accelerator = "gpu" if device == "cuda" else "cpu"
    command = [sys.executable, "-m", "anomaly.cli.train", "logger=none", f"trainer.accelerator={accelerator}",
               "trainer.enable_progress_bar=false", *overrides]  # fmt: skip
    return [*command[:3], "-m", *command[3:], f"hydra.sweep.dir={sweep_dir}"] if sweep_dir else command


def run_records(folder: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(folder.rglob("run.json"))]


def paper_setting(device: str, workdir: Path, quick: bool) -> dict:
    sizes = (["dataset.n_train=8", "dataset.n_test_good=2", "dataset.n_test_defect=4"] if quick
             else ["dataset.n_train=240", "dataset.n_test_good=30", "dataset.n_test_defect=80"])  # fmt: skip
    sizes.append("dataset.n_calibration=0")
    data = [*sizes, "dataset.generated_size=256", "dataset.image_size=256", "dataset.crop_size=224",
            f"dataset.root={workdir / 'data'}", "dataset.calibration_fraction=0", "dataset.num_workers=8",
            f"backbone={'resnet18' if quick else 'wide_resnet50_2'}", "backbone.weights=null"]  # fmt: skip
    seeds = "0" if quick else "0,1,2,3,4"
    results = {}
    for method in ("patchcore", "padim"):
        sweep = workdir / f"paper_{method}"
        sweep_values = [f"dataset.category={','.join(BENCHMARK_CATEGORIES)}", f"seed={seeds}"]
        command = train_command(device, [f"method={method}", *data, *sweep_values], sweep)
        start = time.perf_counter()
        subprocess.run(command, cwd=workdir, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - start
        records = [r for r in run_records(sweep) if r["status"] == "ok"]
        per_run = [r["timings"]["fit_seconds"] + r["timings"]["test_seconds"] for r in records]
        results[method] = {"runs": len(records), "wall_s": round(wall, 1),
                           "fit_test_s_mean": round(sum(per_run) / max(len(per_run), 1), 2),
                           "fit_test_s_max": round(max(per_run, default=0.0), 2)}  # fmt: skip
    stages = subprocess.run(
        [sys.executable, "scripts/benchmark_stages.py", "--json", str(workdir / "stages.json"),
         "--skip-end-to-end", "--", "method=patchcore", *data, "dataset.category=fabric",
         f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    results["patchcore_stages"] = (json.loads((workdir / "stages.json").read_text()) if stages.returncode == 0
                                   else stages.stderr[-500:])  # fmt: skip
    if device == "cuda":
        results["gpu_memory_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return results


def default_job(workdir: Path) -> dict:
    result = {}
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    for device in devices:
        run_dir = workdir / f"default_{device}"
        subprocess.run([*train_command(device, []), f"hydra.run.dir={run_dir}"], cwd=workdir, check=True,
                       capture_output=True, text=True)  # fmt: skip
        record = run_records(run_dir)[0]
        result[device] = {**{k: round(v, 4) for k, v in record["metrics"].items() if k in
                             ("image_auroc", "pixel_auroc", "pixel_aupro")}, **record["timings"]}  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a rehearsal of every step")
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("OUT", ".")) / "gpu_check")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    ensure_dataset(args.workdir / "data", BENCHMARK_CATEGORIES, n_train=8 if args.quick else 240,
                   n_test_good=2 if args.quick else 30, n_test_defect=4 if args.quick else 80)  # fmt: skip
    report = {"environment": environment(args.device)}
    report.update(gpu_tests(args.device))
    report["coreset"] = coreset_benchmark(args.device, 20000 if args.quick else 1_536_000)
    report["paper_setting"] = paper_setting(args.device, args.workdir, args.quick)
    report["default_job"] = default_job(args.workdir)
    text = json.dumps(report, indent=2)
    print(text, flush=True)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
