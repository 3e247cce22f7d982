"""A fitted model as one self-contained ONNX or TorchScript file, written only once its parity is proven.

The exported model takes what a camera gives: RGB ``uint8`` images ``[B, 3, H, W]`` at the size declared
at export (``input_size``), and does the training preprocessing itself (:mod:`anomaly.deploy.preprocess`).
It returns ``(anomaly_map [B, 1, h, w], image_score [B])``, h×w being the training input size.

Nothing is assumed equal: the file is written to a staging folder, run (onnxruntime, ``torch.jit.load``)
beside the eager PyTorch model fed through the training transform on sample images, and moved into place
only if every map pixel and score agrees within ``atol + rtol·|eager|`` (:mod:`anomaly.deploy.parity`).
"""

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from anomaly.backbones import FeatureExtractor
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
from anomaly.errors import ConfigError, DataError
from anomaly.model_io import LoadedModel, find_model_file, load_model
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


def export_model(
    model: str | Path,
    fmt: str,
    output: str | Path | None = None,
    input_size: int | list[int] | None = None,
    batch: int | None = None,
    parity_folder: str | Path | None = None,
    *,
    opset: int,
    device: torch.device,
    atol: float,
    rtol: float,
    num_parity_images: int,
    backbone_weights_path: str | None = None,
) -> ExportResult:
    """Exports the model file (or run dir) ``model`` in format ``fmt`` (a key of ``FORMATS``) to ``output``
    (default: beside it) for raw images of ``input_size`` (default: :func:`resolve_input_size`), with a
    dynamic batch axis unless ``batch`` fixes it. The file is written only after it agrees with the eager
    model on ``num_parity_images`` images (:func:`parity_images`, from ``parity_folder`` if given); else
    ParityError, and nothing is written. ``backbone_weights_path``: as for :func:`load_model`."""
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    if batch is not None and (not isinstance(batch, int) or batch < 1):
        raise ConfigError(f"batch must be null (a dynamic batch axis) or a positive int, got {batch!r}")
    if atol < 0 or rtol < 0 or num_parity_images < 1:
        raise ConfigError("atol and rtol must be >= 0, num_parity_images >= 1")
    model_file = find_model_file(model)
    loaded = load_model(model_file, device, backbone_weights_path)
    for module in loaded.model.modules():  # graphs and their eager reference run the backbone in float32
        if isinstance(module, FeatureExtractor) and module.precision != "float32":
            log.info(
                "Exporting the %s backbone in float32 (trained with %s).", module.precision, module.precision
            )
            module.set_precision("float32")
    size = resolve_input_size(input_size, loaded.preprocessing.image_size)
    output = Path(output) if output else model_file.with_suffix(FORMATS[fmt])
    preprocess = Preprocess(size, loaded.preprocessing).to(device)
    exported = ExportedModel(preprocess, graph_ready(loaded.model)).eval()
    input_shape = [batch or "batch", 3, *size]
    metadata = export_metadata(loaded, model_file, input_shape, preprocess.output_size)
    images, description = parity_images(parity_folder, num_parity_images, model_file, size)
    example = images[torch.arange(batch or TRACE_BATCH) % len(images)].to(device)
    with torch.no_grad():  # once eagerly: the backbones' cell geometry at this size is probed, not traced
        exported(example)

    staging = output.parent / f".{output.name}.partial"  # the file(s) appear at output only once verified
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        log.info("Exporting %s (%s) to %s", model_file, fmt, output)
        if fmt == "onnx":
            export_onnx(exported, example, staging / output.name, opset, batch is None, metadata)
        else:
            export_torchscript(exported, example, staging / output.name, metadata)
        run = load_exported(staging / output.name, fmt, device)
        batches = parity_batches(images, batch)
        parity = check_parity(run, loaded.model, device, batches, loaded.preprocessing, atol, rtol)
        if parity.failures:
            other_formats = " / ".join(f"format={name}" for name in FORMATS if name != fmt)
            raise ParityError(
                f"the exported {fmt} model differs from the eager PyTorch model: {parity.failures} values "
                f"beyond |exported - eager| <= atol + rtol*|eager| (atol={atol}, rtol={rtol}) on "
                f"{len(images)} {description}: {parity.describe()}. Nothing was written to {output}. "
                f"Export the other format ({other_formats}) or, if the differences are float rounding on "
                "this device, raise atol/rtol."
            )
        for file in staging.iterdir():
            file.replace(output.parent / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(output, parity, f"{len(images)} {description}", input_shape, preprocess.output_size)


def export_metadata(
    loaded: LoadedModel, model_file: Path, input_shape: list, output_size: tuple[int, int]
) -> dict:
    """The JSON contract stored in the exported file: its input and outputs, preprocessing, calibration."""
    return {
        "method": loaded.method,
        "source": str(model_file),
        "input": {"name": INPUT_NAME, "dtype": "uint8", "channels": "RGB", "shape": input_shape},
        "outputs": {
            "anomaly_map": {"dtype": "float32", "shape": [input_shape[0], 1, *output_size]},
            "image_score": {"dtype": "float32", "shape": [input_shape[0]]},
        },
        "preprocessing": {**loaded.preprocessing.to_dict(), "scale": "1/255"},
        "calibration": loaded.calibration.to_dict() if loaded.calibration else None,
    }


def parity_images(
    folder: str | Path | None, count: int, model_file: Path, input_size: tuple[int, int]
) -> tuple[Tensor, str]:
    """``(uint8 [N, 3, H, W], what they are)``: up to ``count`` images of ``folder``, else the run's sample
    images (its run.json lists them) if still on disk, else generated photo-like images."""
    if folder:
        files = list_images_recursive(Path(folder))
        if not files:
            raise DataError(f"parity_images={folder}: no image files there")
        where = str(folder)
    else:
        record = RunRecord.read(model_file.parent)
        files = [Path(path) for path in (record.sample_images if record else []) if Path(path).is_file()]
        where = "the run's test set"
    if not files:
        return generated_images(count, input_size), "generated images"
    return sample_images(files, count, input_size), f"images from {where}"


def resolve_input_size(
    input_size: int | list[int] | None, image_size: int | tuple[int, int]
) -> tuple[int, int]:
    """``(H, W)`` of the raw input; by default what the training resize makes of a square image."""
    size = image_size if input_size is None else input_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    if len(size) != 2 or min(size) < 1:
        raise ConfigError(f"input_size must be [H, W] (or one int for a square), got {input_size}")
    return int(size[0]), int(size[1])
