"""Inference speed of fitted models in PyTorch eager, TorchScript and ONNX Runtime, on the CPU and CUDA.

Every runtime gets the same input, the exported models' contract: a batch of RGB uint8 images at the
input size, preprocessing included (eager: the same ``ExportedModel`` wrapper, with the method's own
k-NN backend, faiss for PatchCore on the CPU). The TorchScript and ONNX files are written by
``anomaly.cli.export.export``, the ``anomaly-export`` job, so each one has passed its parity check first.

Latency: batch 1, median of ``--runs`` timed runs after ``--warmup`` untimed ones. Throughput: images per
second at each ``--batch-sizes`` entry, from the median of ``--throughput-runs`` batches. CUDA rows appear
when torch sees a GPU (ONNX Runtime's only when its CUDA provider is installed).

Without model arguments, tiny models are first trained on the generated data set for ``--methods``
(PaDiM and PatchCore as configured; SimpleNet 1 epoch and EfficientAD 10 steps with a random PDN teacher,
enough for timing, not for detection). Examples (with the package installed, ``pip install -e .``):

    python scripts/benchmark_inference.py --json outputs/benchmarks/inference.json
    python scripts/benchmark_inference.py outputs/runs/patchcore/bottle/<date_time> --input-size 1024 1024
"""

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime
import torch
from hydra import compose, initialize_config_dir

import anomaly
from anomaly.cli.export import export
from anomaly.cli.runtime import prepare_process
from anomaly.config import config_dir
from anomaly.deploy.export import resolve_input_size
from anomaly.deploy.parity import generated_images
from anomaly.deploy.preprocess import ExportedModel, Preprocess
from anomaly.model_io import load_model

QUICK_TRAINING = {
    "simplenet": ["method.max_epochs=1"],
    "efficientad": ["method.max_steps=10", "dataset.batch_size=1", "dataset.calibration_fraction=0.2"],
}


def train_tiny(method: str, workdir: Path) -> Path:
    """anomaly-train's job (:func:`anomaly.run`) on the generated data set (its defaults: 60 training
    images at 256 px); returns the run dir."""
    overrides = [
        f"method={method}",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "dataset.n_calibration=0",  # the model's speed is measured, not its threshold
        f"paths.data_dir={workdir / 'data'}",
        *QUICK_TRAINING.get(method, []),
    ]
    if method == "efficientad":
        from anomaly.methods.efficientad.model import patch_description_network

        torch.save(patch_description_network(384, "small").state_dict(), workdir / "teacher.pth")
        overrides.append(f"method.model.teacher_weights={workdir / 'teacher.pth'}")
    result = anomaly.run(anomaly.compose(overrides, output_dir=workdir / method))
    print(result.describe(), flush=True)
    return result.output_dir


def export_file(model: Path, fmt: str, output: Path, input_size: tuple[int, int], device: str) -> Path:
    overrides = [
        f"model={model}",
        f"format={fmt}",
        f"output={output}",
        f"input_size=[{input_size[0]},{input_size[1]}]",
    ]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return export(
            compose("export", overrides=[*overrides, f"device={device}", "num_parity_images=4"])
        ).path


def median_seconds(
    run: Callable[[torch.Tensor], object], images: torch.Tensor, warmup: int, runs: int
) -> float:
    """Median wall time of ``run(images)``; waits for the GPU, if any, around each run."""
    for _ in range(warmup):
        run(images)
    times = []
    for _ in range(runs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        run(images)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(
    run: Callable[[torch.Tensor], object], input_size: tuple[int, int], args: argparse.Namespace
) -> dict:
    """Batch-1 latency (ms) and throughput (images/s) per batch size, on generated images."""
    with torch.no_grad():
        result = {
            "latency_ms": 1000 * median_seconds(run, generated_images(1, input_size), args.warmup, args.runs)
        }
        for batch in args.batch_sizes:
            images = generated_images(batch, input_size, seed=batch)
            result[f"throughput_b{batch}"] = batch / median_seconds(run, images, 1, args.throughput_runs)
    return result


def runtimes(model: Path, stem: Path, device: str, input_size: tuple[int, int], threads: int) -> dict:
    """``{runtime: function(uint8 batch)}`` on ``device``; the files are exported (and checked) for it."""
    loaded = load_model(model, device=device)
    eager = ExportedModel(Preprocess(input_size, loaded.preprocessing), loaded.model).to(device).eval()
    traced = export_file(model, "torchscript", stem.with_name(f"{stem.name}-{device}.pt"), input_size, device)
    scripted = torch.jit.load(str(traced), map_location=device)
    result = {"pytorch": lambda x: eager(x.to(device)), "torchscript": lambda x: scripted(x.to(device))}
    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    if provider in onnxruntime.get_available_providers():
        onnx_path = stem.with_suffix(".onnx")
        if not onnx_path.exists():  # one file serves every device
            export_file(model, "onnx", onnx_path, input_size, "cpu")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(str(onnx_path), options, providers=[provider])
        result["onnxruntime"] = lambda x: session.run(None, {"images": x.numpy()})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "models", nargs="*", type=Path, help="run dirs (or model.safetensors); none: train tiny ones"
    )
    parser.add_argument("--methods", nargs="+", default=["padim", "patchcore", "simplenet", "efficientad"])
    parser.add_argument(
        "--input-size", nargs=2, type=int, default=None, help="H W of the raw input (default: training size)"
    )
    parser.add_argument("--runs", type=int, default=30, help="timed batch-1 runs (latency)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs before timing")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 32], help="throughput batch sizes")
    parser.add_argument("--throughput-runs", type=int, default=5, help="timed batches per batch size")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="CPU threads of every runtime"
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where models and exports go (default: a temp dir)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here as JSON")
    args = parser.parse_args()
    prepare_process(reuse_freed_memory=True, num_threads=args.threads)  # as anomaly-predict does by default
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="anomaly-benchmark-"))
    workdir.mkdir(parents=True, exist_ok=True)
    models = [m.parent if m.is_file() else m for m in args.models] or [
        train_tiny(m, workdir) for m in args.methods
    ]
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]

    rows = []
    for index, model in enumerate(models):
        loaded = load_model(model)
        method = loaded.method
        image_size = loaded.preprocessing.image_size
        input_size = resolve_input_size(args.input_size, image_size)
        del loaded
        for device in devices:
            stem = workdir / f"{index}-{method}"
            for runtime, run in runtimes(model, stem, device, input_size, args.threads).items():
                row = {"method": method, "model": str(model), "runtime": runtime, "device": device}
                row.update(input_size=list(input_size), **measure(run, input_size, args))
                rows.append(row)
                print_row(row, args.batch_sizes, header=len(rows) == 1)

    if args.json:
        environment = {
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"environment": environment, "results": rows}, indent=2) + "\n")
        print(f"\nwrote {args.json}")


def print_row(row: dict, batch_sizes: list[int], header: bool) -> None:
    if header:
        columns = "".join(f"{f'b{b} img/s':>12}" for b in batch_sizes)
        print(f"\n{'method':<12}{'runtime':<13}{'device':<8}{'input':<11}{'b1 ms':>9}{columns}")
    size = "x".join(map(str, row["input_size"]))
    throughput = "".join(f"{row[f'throughput_b{b}']:>12.1f}" for b in batch_sizes)
    print(
        f"{row['method']:<12}{row['runtime']:<13}{row['device']:<8}{size:<11}{row['latency_ms']:>9.1f}{throughput}"
    )


if __name__ == "__main__":
    main()
