"""``anomaly-export``: a fitted model as one self-contained ONNX or TorchScript file, with parity proven.

The exported model takes what a camera gives: RGB ``uint8`` images ``[B, 3, H, W]`` at the size declared
at export (``input_size``), and does the training preprocessing itself (:mod:`anomaly.deploy.preprocess`).
It returns ``(anomaly_map [B, 1, h, w], image_score [B])``, h×w being the training input size.

Nothing is assumed equal: the file is written to a staging folder, run (onnxruntime, ``torch.jit.load``)
beside the eager PyTorch model fed through the training transform on sample images, and moved into place
only if every map pixel and score agrees within ``atol + rtol·|eager|`` (:mod:`anomaly.deploy.parity`).
"""

import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from anomaly.backbones import FeatureExtractor
from anomaly.cli.runtime import CONFIG_PATH, prepare_process, report_user_errors
from anomaly.data.samples import list_images_recursive
from anomaly.deploy.formats import (
    FORMATS,
    INPUT_NAME,
    export_onnx,
    export_torchscript,
    graph_ready,
    load_exported,
)
from anomaly.deploy.parity import (
    Parity,
    ParityError,
    check_parity,
    generated_images,
    parity_batches,
    sample_images,
)
from anomaly.deploy.preprocess import ExportedModel, Preprocess
from anomaly.errors import ConfigError, DataError, ModelFileError
from anomaly.model_io import load_model
from anomaly.reports.records import RunRecord

log = logging.getLogger(__name__)
TRACE_BATCH = 2  # tracing example batch; parity then also runs batch 1, which tests the dynamic axis


@dataclass
class ExportResult:
    path: Path
    parity: Parity
    parity_images: str  # what the parity images were
    input_shape: list  # ["batch" or B, 3, H, W]
    output_size: tuple[int, int]  # (h, w) of the anomaly map


def export(cfg: DictConfig) -> ExportResult:
    """The ``anomaly-export`` job: writes the file only after its parity is shown; else ParityError."""
    if cfg.format not in FORMATS:
        raise ConfigError(f"format must be one of {list(FORMATS)}, got {cfg.format!r}")
    if cfg.batch is not None and (not isinstance(cfg.batch, int) or cfg.batch < 1):
        raise ConfigError(f"batch must be null (a dynamic batch axis) or a positive int, got {cfg.batch!r}")
    if cfg.atol < 0 or cfg.rtol < 0 or cfg.num_parity_images < 1:
        raise ConfigError("atol and rtol must be >= 0, num_parity_images >= 1")
    model_file = find_model_file(cfg.model)
    device = torch.device(cfg.device)
    loaded = load_model(model_file, device=str(device))
    for module in loaded.model.modules():  # graphs and their eager reference run the backbone in float32
        if isinstance(module, FeatureExtractor) and module.precision != "float32":
            log.info(
                "Exporting the %s backbone in float32 (trained with %s).", module.precision, module.precision
            )
            module.set_precision("float32")
    preprocessing = loaded.preprocessing
    input_size = resolve_input_size(cfg.input_size, preprocessing.image_size)
    output = Path(cfg.output) if cfg.output else model_file.with_suffix(FORMATS[cfg.format])

    preprocess = Preprocess(input_size, preprocessing).to(device)
    exported = ExportedModel(preprocess, graph_ready(loaded.model)).eval()
    input_shape = [cfg.batch or "batch", 3, *input_size]
    metadata = {
        "method": loaded.method,
        "source": str(model_file),
        "input": {"name": INPUT_NAME, "dtype": "uint8", "channels": "RGB", "shape": input_shape},
        "outputs": {
            "anomaly_map": {"dtype": "float32", "shape": [input_shape[0], 1, *preprocess.output_size]},
            "image_score": {"dtype": "float32", "shape": [input_shape[0]]},
        },
        "preprocessing": {**preprocessing.to_dict(), "scale": "1/255"},
        "calibration": loaded.calibration.to_dict() if loaded.calibration else None,
    }
    images, description = parity_images(cfg, model_file, input_size)
    example = images[torch.arange(cfg.batch or TRACE_BATCH) % len(images)].to(device)

    staging = output.parent / f".{output.name}.partial"  # the file(s) appear at output only once verified
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        log.info("Exporting %s (%s) to %s", model_file, cfg.format, output)
        if cfg.format == "onnx":
            export_onnx(exported, example, staging / output.name, cfg.opset, cfg.batch is None, metadata)
        else:
            export_torchscript(exported, example, staging / output.name, metadata)
        run = load_exported(staging / output.name, cfg.format, device)
        batches = parity_batches(images, cfg.batch)
        parity = check_parity(run, loaded.model, device, batches, preprocessing, cfg.atol, cfg.rtol)
        if parity.failures:
            raise ParityError(
                f"the exported {cfg.format} model differs from the eager PyTorch model: {parity.failures} "
                f"values beyond |exported - eager| <= atol + rtol*|eager| (atol={cfg.atol}, rtol={cfg.rtol}) "
                f"on {len(images)} {description}: {parity.describe()}. Nothing was written to {output}."
            )
        for file in staging.iterdir():
            file.replace(output.parent / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result = ExportResult(output, parity, f"{len(images)} {description}", input_shape, preprocess.output_size)
    print_summary(cfg, result)
    return result


def parity_images(cfg: DictConfig, model_file: Path, input_size: tuple[int, int]) -> tuple:
    """``(uint8 [N, 3, H, W], what they are)``: the ``parity_images`` folder, else the run's sample images
    (its run.json lists them) if still on disk, else generated photo-like images."""
    if cfg.parity_images:
        files = list_images_recursive(Path(cfg.parity_images))
        if not files:
            raise DataError(f"parity_images={cfg.parity_images}: no image files there")
        where = cfg.parity_images
    else:
        record = RunRecord.read(model_file.parent)
        files = [Path(path) for path in (record.sample_images if record else []) if Path(path).is_file()]
        where = "the run's test set"
    if not files:
        return generated_images(cfg.num_parity_images, input_size), "generated images"
    return sample_images(files, cfg.num_parity_images, input_size), f"images from {where}"


def find_model_file(model: str | Path) -> Path:
    """``model`` is a run dir or its ``model.safetensors``."""
    path = Path(model)
    path = path / "model.safetensors" if path.is_dir() else path
    if not path.is_file():
        raise ModelFileError(f"no model file {path}: pass model=<run dir> or <run dir>/model.safetensors")
    return path


def resolve_input_size(
    input_size: int | list[int] | None, image_size: int | tuple[int, int]
) -> tuple[int, int]:
    """``(H, W)`` of the raw input; by default what the training resize makes of a square image."""
    size = image_size if input_size is None else input_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(f"input_size must be [H, W] (or one int for a square), got {input_size}")
    return int(size[0]), int(size[1])


def print_summary(cfg: DictConfig, result: ExportResult) -> None:
    parity, (height, width) = result.parity, result.output_size
    size_mib = sum(p.stat().st_size for p in result.path.parent.glob(f"{result.path.name}*")) / 2**20
    print(
        f"\nExported {result.path} ({cfg.format}, {size_mib:.1f} MiB)\n"
        f"  input   {INPUT_NAME}: uint8 RGB {result.input_shape}\n"
        f"  outputs anomaly_map: float32 [{result.input_shape[0]}, 1, {height}, {width}], "
        f"image_score: float32 [{result.input_shape[0]}]\n"
        f"  parity with the eager PyTorch model (training transform) on {result.parity_images}:\n"
        f"    anomaly_map  max abs diff {parity.map_abs:.3g}  max rel diff {parity.map_rel:.3g}\n"
        f"    image_score  max abs diff {parity.score_abs:.3g}  max rel diff {parity.score_rel:.3g}\n"
        f"    passed: every value within atol + rtol*|eager| (atol={cfg.atol}, rtol={cfg.rtol})\n",
        flush=True,
    )


def run_export(cfg: DictConfig) -> None:
    try:
        export(cfg)
    except ParityError as error:
        print(f"PARITY CHECK FAILED: {error}", file=sys.stderr, flush=True)
        sys.exit(1)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def main(cfg: DictConfig) -> None:
    prepare_process()
    report_user_errors(lambda: run_export(cfg))


if __name__ == "__main__":
    main()
