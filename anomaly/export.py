"""``anomaly-export``: a fitted model as one self-contained ONNX or TorchScript file, with parity proven.

The exported model takes what a camera gives: RGB ``uint8`` images ``[B, 3, H, W]`` at the size declared
at export (``input_size``), and does the training preprocessing itself: torchvision's antialiased resize,
reproduced bit for bit in integer arithmetic (torchvision's CPU ``uint8`` kernel, which the training data
loaders run), the centre crop, the scaling to [0, 1]. The backbone's own normalisation is part of the
model. It returns ``(anomaly_map [B, 1, h, w], image_score [B])``, h×w being the training input size.

Nothing is assumed equal: the file is written to a staging folder, run (onnxruntime, ``torch.jit.load``)
beside the eager PyTorch model fed through the training transform (``Preprocessing``) on sample images,
and moved into place only if every map pixel and score agrees within ``atol + rtol·|eager|``.
"""

import copy
import json
import logging
import math
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

from anomaly.data.preprocessing import Preprocessing
from anomaly.data.samples import IMAGE_EXTENSIONS, read_image
from anomaly.model_io import load_model

log = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}  # format -> suffix replacing .safetensors
INPUT_NAME, OUTPUT_NAMES = "images", ("anomaly_map", "image_score")
TRACE_BATCH = 2  # tracing example batch; parity then also runs batch 1, which tests the dynamic axis
METADATA_KEY = "anomaly_export"  # ONNX metadata_props key / TorchScript extra file: the JSON contract
MAX_SINGLE_FILE_BYTES = 1.5 * 2**30  # protobuf caps an ONNX file at 2 GiB; more weights go to a .data file
Run = Callable[[Tensor], tuple[Tensor, Tensor]]


class ParityError(RuntimeError):
    """The exported model's outputs differ from the eager model's beyond the tolerance."""


# --- preprocessing inside the graph -------------------------------------------------------------------


def resize_taps(in_size: int, out_size: int) -> tuple[Tensor, Tensor, int]:
    """torch's ``uint8`` antialiased bilinear taps along one axis: source indices ``[out, taps]``, integer
    weights ``[out, taps]`` and their fixed-point precision.

    The float64 weights, their int16 rounding and the precision rule of ATen's
    ``HelperInterpBase::_compute_index_ranges_int16_weights`` (what ``v2.Resize(antialias=True)`` runs on
    ``uint8`` CPU images), so that the exported resize gives identical pixels. Unused taps get weight 0.
    """
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0  # bilinear: half-width 1, widened by the scale when shrinking
    taps = math.ceil(support) * 2 + 1
    inv_scale = 1.0 / scale if scale >= 1.0 else 1.0
    index = torch.zeros(out_size, taps, dtype=torch.int64)
    weights = np.zeros((out_size, taps))
    for i in range(out_size):
        center = scale * (i + 0.5)
        start = max(int(center - support + 0.5), 0)
        size = min(max(min(int(center + support + 0.5), in_size) - start, 0), taps)
        row = [max(0.0, 1.0 - abs((j + start - center + 0.5) * inv_scale)) for j in range(size)]
        total = sum(row)
        weights[i, :size] = [w / total for w in row] if total != 0.0 else row
        index[i] = torch.arange(start, start + taps).clamp(max=in_size - 1)
    precision = 0
    while precision < 22 and int(0.5 + weights.max() * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    fixed = np.floor(0.5 + weights * (1 << precision)).astype(np.int32)
    return index, torch.from_numpy(fixed), precision


class AxisResize(nn.Module):
    """One separable pass of the ``uint8`` antialiased resize over ``dim`` (2 = height, 3 = width).

    Integer arithmetic (int32: 255·2^22 fits), one gather per tap so memory stays that of the output, and
    ``(Σ x·w + 2^(p-1)) >> p`` clamped to [0, 255], as ATen's ``basic_loop_aa_*<uint8_t>``.
    """

    def __init__(self, in_size: int, out_size: int, dim: int) -> None:
        super().__init__()
        index, weights, precision = resize_taps(in_size, out_size)
        self.dim = dim
        self.precision = precision
        self.register_buffer("index", index.T.contiguous())  # [taps, out]
        shape = (-1, out_size, 1) if dim == 2 else (-1, out_size)
        self.register_buffer("weights", weights.T.reshape(shape).contiguous())  # [taps, out(, 1)]

    def forward(self, x: Tensor) -> Tensor:
        total = torch.full((), 1 << (self.precision - 1), dtype=torch.int32, device=x.device)
        for index, weights in zip(self.index, self.weights, strict=True):
            total = total + x.index_select(self.dim, index) * weights
        # non-negative weights: the sum is >= 0, so truncating division is the kernel's right shift
        return torch.div(total, 1 << self.precision, rounding_mode="trunc").clamp(0, 255)


class Preprocess(nn.Module):
    """``uint8 [B, 3, H, W]`` at ``input_size`` → float ``[B, 3, h, w]`` in [0, 1], as the training transform.

    The steps are read off the training transform itself (sizes and crop offsets by running its steps on
    probe images), so the export cannot drift from it; a step it cannot reproduce is an error.
    """

    def __init__(self, input_size: tuple[int, int], preprocessing: Preprocessing) -> None:
        super().__init__()
        height, width = input_size
        passes: list[nn.Module] = []
        self.crop = (0, 0, height, width)  # top, left, height, width
        scaled = False
        for step in preprocessing.transform().transforms:
            if isinstance(step, v2.Resize):
                if InterpolationMode(step.interpolation) != InterpolationMode.BILINEAR or not step.antialias:
                    raise ValueError(f"cannot reproduce {step}: only bilinear with antialias is supported")
                new_height, new_width = step(torch.zeros(1, height, width, dtype=torch.uint8)).shape[-2:]
                if new_width != width:  # torch resizes the width first, then the height
                    passes.append(AxisResize(width, new_width, dim=3))
                if new_height != height:
                    passes.append(AxisResize(height, new_height, dim=2))
                height, width = new_height, new_width
            elif isinstance(step, v2.CenterCrop):
                self.crop = centre_crop_box(step, height, width)
                height, width = self.crop[2:]
            elif isinstance(step, v2.ToDtype) and step.scale and image_dtype(step) == torch.float32:
                scaled = True
            else:
                raise ValueError(f"cannot export the training transform step {step}")
        if not scaled:
            raise ValueError("the training transform does not scale images to [0, 1]; cannot export it")
        self.resize = nn.Sequential(*passes)
        self.output_size = (height, width)

    def forward(self, images: Tensor) -> Tensor:
        x = self.resize(images.to(torch.int32)) if len(self.resize) else images
        top, left, height, width = self.crop
        x = x[:, :, top : top + height, left : left + width]
        return x.to(torch.float32) * (1.0 / 255)  # as ToDtype(scale=True): the same float32 product


def image_dtype(step: v2.ToDtype) -> torch.dtype | None:
    """The dtype ``step`` gives images (its ``dtype`` is one dtype or a per-type dict)."""
    return step.dtype.get(tv_tensors.Image) if isinstance(step.dtype, dict) else step.dtype


def centre_crop_box(step: v2.CenterCrop, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) that ``step`` cuts from a ``height×width`` image, found by cropping an
    image of 1-based pixel numbers; torchvision pads crops larger than the image, which is refused."""
    numbers = torch.arange(1, height * width + 1, dtype=torch.int64).reshape(1, height, width)
    cropped = step(numbers)
    if (cropped == 0).any():
        raise ValueError(f"crop {step.size} is larger than the resized image {height}x{width}")
    top, left = divmod(int(cropped[0, 0, 0]) - 1, width)
    return top, left, cropped.shape[-2], cropped.shape[-1]


class ExportedModel(nn.Module):
    """Preprocessing + any model of the :class:`~anomaly.methods.base.AnomalyOutput` contract."""

    def __init__(self, preprocess: Preprocess, model: nn.Module) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        output = self.model(self.preprocess(images))
        return output.anomaly_map, output.image_score


def prepare_for_export(model: nn.Module) -> nn.Module:
    """Graph-friendly settings that keep the values: a memory-bank k-NN (PatchCore) uses its pure-torch
    search inside the graph (the same exact distances as faiss, see ``nearest_neighbors.refine``);
    in-place activations work out of place (torch.export decomposes each in-place op under a symbolic
    batch, ~0.3 s apiece)."""
    if hasattr(model, "knn_backend"):
        model.knn_backend = "torch"
    for module in model.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    return model


# --- writing and running the files --------------------------------------------------------------------


def export_onnx(
    module: nn.Module, example: Tensor, path: Path, opset: int, dynamic_batch: bool, metadata: dict
) -> None:
    """torch.export + the ONNX translation (CPU); the JSON contract goes into ``metadata_props``."""
    import onnx

    module, example = copy.deepcopy(module).cpu(), example.cpu()
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    weight_bytes = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    with torch.no_grad():
        program = torch.onnx.export(
            module, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES), dynamic_shapes=dynamic_shapes, verbose=False,
        )  # fmt: skip
    program.model.metadata_props[METADATA_KEY] = json.dumps(metadata)
    program.save(str(path), external_data=weight_bytes > MAX_SINGLE_FILE_BYTES)
    onnx.checker.check_model(str(path))


class InputCheck(nn.Module):
    """Scripted guard around a traced graph, which would silently crop or misread another image size or
    dtype (ONNX Runtime refuses them by the graph's input type); TorchScript files refuse them too."""

    def __init__(self, traced: nn.Module, height: int, width: int) -> None:
        super().__init__()
        self.traced = traced
        self.height = height
        self.width = width

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if images.dtype != torch.uint8:
            raise ValueError("expected uint8 images (raw 0-255 RGB: the model scales them itself)")
        if images.dim() != 4 or images.shape[1:] != [3, self.height, self.width]:
            raise ValueError(
                f"expected images [batch, 3, {self.height}, {self.width}], got {list(images.shape)}"
            )
        return self.traced(images)


def export_torchscript(module: nn.Module, example: Tensor, path: Path, metadata: dict) -> None:
    """``torch.jit.trace`` on the example's device (a traced graph keeps the device it was traced on),
    behind a scripted :class:`InputCheck`."""
    with torch.no_grad(), warnings.catch_warnings():
        # TracerWarnings flag Python values frozen into the graph; the parity check runs other batch
        # sizes than the traced one, which is what they warn about. TorchScript is deprecated upstream.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
        traced = torch.jit.trace(module, (example,), check_trace=False)
        checked = torch.jit.script(InputCheck(traced, *example.shape[-2:]))
        torch.jit.save(checked, str(path), _extra_files={f"{METADATA_KEY}.json": json.dumps(metadata)})


def load_exported(path: Path, fmt: str, device: torch.device) -> Run:
    """``uint8 images -> (map, score)`` running the written file as a user would."""
    if fmt == "onnx":
        import onnxruntime

        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # as the eager side, not one per core
        session = onnxruntime.InferenceSession(str(path), options, providers=providers)
        return lambda images: tuple(
            torch.from_numpy(out) for out in session.run(None, {INPUT_NAME: images.cpu().numpy()})
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
        scripted = torch.jit.load(str(path), map_location=device)

    def run(images: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return scripted(images.to(device))

    return run


# --- parity -------------------------------------------------------------------------------------------


@dataclass
class Parity:
    """Largest differences exported vs eager over all parity batches (``rel`` = |Δ| / |eager|)."""

    map_abs: float = 0.0
    map_rel: float = 0.0
    score_abs: float = 0.0
    score_rel: float = 0.0
    failures: int = 0  # values beyond atol + rtol·|eager|

    def update(
        self, exported: tuple[Tensor, Tensor], eager: tuple[Tensor, Tensor], atol: float, rtol: float
    ) -> None:
        for name, got, want in zip(("map", "score"), exported, eager, strict=True):
            got, want = got.double().cpu(), want.double().cpu()
            if got.shape != want.shape:
                raise ParityError(f"exported {name} shape {list(got.shape)} != eager {list(want.shape)}")
            diff = (got - want).abs()
            rel = (diff / want.abs())[want != 0]
            largest_rel = float(rel.max()) if rel.numel() else 0.0
            setattr(self, f"{name}_abs", max(getattr(self, f"{name}_abs"), float(diff.max())))
            setattr(self, f"{name}_rel", max(getattr(self, f"{name}_rel"), largest_rel))
            self.failures += int((~(diff <= atol + rtol * want.abs())).sum())  # NaN counts as a failure

    def describe(self) -> str:
        return (
            f"anomaly_map max abs diff {self.map_abs:.3g}, max rel diff {self.map_rel:.3g}; "
            f"image_score max abs diff {self.score_abs:.3g}, max rel diff {self.score_rel:.3g}"
        )


def eager_reference(
    model: nn.Module, images: Tensor, transform: v2.Compose, device: torch.device
) -> tuple[Tensor, Tensor]:
    """The eager model on ``uint8`` images through the training transform, image by image on the CPU as
    the data loaders do."""
    batch = torch.stack([transform(tv_tensors.Image(image)) for image in images]).as_subclass(Tensor)
    with torch.no_grad():
        output = model(batch.to(device))
    return output.anomaly_map, output.image_score


def parity_images(
    cfg: DictConfig, run_cfg: DictConfig | None, input_size: tuple[int, int]
) -> tuple[Tensor, str]:
    """``uint8 [N, 3, H, W]`` sample images and what they are.

    ``parity_images`` (a folder), else the training data set's files if they are on disk, else generated
    images; files of another size are resized to ``input_size`` first (antialiased, as a user would).
    """
    if cfg.parity_images:
        folder = Path(cfg.parity_images)
        files = image_files(folder, excluded=())
        if not files:
            raise FileNotFoundError(f"parity_images={folder}: no image files there")
    else:
        folder, files = dataset_image_files(run_cfg)
    if not files:
        return generated_images(cfg.num_parity_images, input_size), "generated images"
    picks = np.linspace(0, len(files) - 1, min(cfg.num_parity_images, len(files))).round().astype(int)
    images = []
    for index in picks:
        image = read_image(files[index])
        if tuple(image.shape[-2:]) != input_size:
            image = v2.functional.resize(image, list(input_size), antialias=True)
        images.append(image)
    return torch.stack(images), f"images from {folder}"


def image_files(folder: Path, excluded: tuple[str, ...]) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted), skipping paths through an ``excluded`` folder."""
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and not set(p.relative_to(folder).parts[:-1]) & set(excluded)
    )  # fmt: skip


def dataset_image_files(run_cfg: DictConfig | None) -> tuple[Path | None, list[Path]]:
    """The training data set's folder and images (test and train, ground-truth masks excluded)."""
    dataset = run_cfg.get("dataset") if run_cfg else None
    if not dataset or OmegaConf.is_missing(dataset, "root") or not dataset.get("root"):
        return None, []
    folder = Path(dataset.root) / dataset.category if dataset.get("category") else Path(dataset.root)
    return folder, image_files(folder, excluded=("ground_truth", str(dataset.get("mask_dir", "mask"))))


def generated_images(count: int, size: tuple[int, int], seed: int = 0) -> Tensor:
    """``uint8 [count, 3, H, W]`` photo-like images: a tinted surface with smooth shading, texture at three
    scales and sensor noise, each with a foreign blob, so that scores span normal and anomalous values."""
    generator = torch.Generator().manual_seed(seed)
    height, width = size

    def noise(channels: int, cell: int) -> Tensor:
        grid = torch.rand(1, channels, height // cell + 2, width // cell + 2, generator=generator)
        return F.interpolate(grid, size=size, mode="bicubic", align_corners=False)[0]

    rows, cols = torch.arange(height).view(-1, 1) / height, torch.arange(width).view(1, -1) / width
    images = []
    for _ in range(count):
        image = 0.25 + 0.5 * torch.rand(3, 1, 1, generator=generator)
        image = image + 0.25 * (noise(1, max(height, width) // 2) - 0.5)
        image = image + sum(amp * (noise(3, cell) - 0.5) for amp, cell in ((0.15, 16), (0.1, 4), (0.06, 1)))
        centre, radius = torch.rand(2, generator=generator), 0.04 + 0.1 * torch.rand(2, generator=generator)
        blob = ((rows - centre[0]) / radius[0]) ** 2 + ((cols - centre[1]) / radius[1]) ** 2 <= 1
        image = torch.where(blob, torch.rand(3, 1, 1, generator=generator), image)
        images.append((image + 0.02 * torch.randn(3, height, width, generator=generator)).clamp(0, 1))
    return (torch.stack(images) * 255).round().to(torch.uint8)


def parity_batches(images: Tensor, batch: int | None) -> list[Tensor]:
    """Dynamic batch: all images at once and the first alone; a fixed batch: the images in batches of
    that size, the last one filled up cyclically."""
    if batch is None:
        return [images, images[:1]]
    count = math.ceil(len(images) / batch) * batch
    return list(images[torch.arange(count) % len(images)].split(batch))


def check_parity(
    run: Run, reference: nn.Module, device: torch.device, batches: list[Tensor], preprocessing: Preprocessing,
    atol: float, rtol: float,
) -> Parity:  # fmt: skip
    """Runs the exported file and the eager model on ``device`` (fed through the training transform) on
    each batch of ``uint8`` images."""
    parity, steps = Parity(), preprocessing.transform()
    for batch in batches:
        parity.update(run(batch), eager_reference(reference, batch, steps, device), atol, rtol)
    return parity


# --- the command --------------------------------------------------------------------------------------


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
        raise ValueError(f"format must be one of {list(FORMATS)}, got {cfg.format!r}")
    if cfg.batch is not None and (not isinstance(cfg.batch, int) or cfg.batch < 1):
        raise ValueError(f"batch must be null (a dynamic batch axis) or a positive int, got {cfg.batch!r}")
    if cfg.atol < 0 or cfg.rtol < 0 or cfg.num_parity_images < 1:
        raise ValueError("atol and rtol must be >= 0, num_parity_images >= 1")
    model_file = find_model_file(cfg.model)
    device = torch.device(cfg.device)
    loaded = load_model(model_file, device=str(device))
    run_cfg = load_run_config(model_file)
    preprocessing = loaded.preprocessing
    input_size = resolve_input_size(cfg.input_size, preprocessing.image_size)
    output = Path(cfg.output) if cfg.output else model_file.with_suffix(FORMATS[cfg.format])

    preprocess = Preprocess(input_size, preprocessing).to(device)
    exported = ExportedModel(preprocess, prepare_for_export(copy.deepcopy(loaded.model))).eval()
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
    images, description = parity_images(cfg, run_cfg, input_size)
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


def find_model_file(model: str | Path) -> Path:
    """``model`` is a run dir or its ``model.safetensors``."""
    path = Path(model)
    path = path / "model.safetensors" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no model file {path}: pass model=<run dir> or <run dir>/model.safetensors")
    return path


def load_run_config(model_file: Path) -> DictConfig | None:
    """The run's ``config.yaml`` next to the model file, if there (it names the training data set)."""
    path = model_file.parent / "config.yaml"
    return OmegaConf.load(path) if path.is_file() else None


def resolve_input_size(
    input_size: int | list[int] | None, image_size: int | tuple[int, int]
) -> tuple[int, int]:
    """``(H, W)`` of the raw input; by default what the training resize makes of a square image."""
    size = image_size if input_size is None else input_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"input_size must be [H, W] (or one int for a square), got {input_size}")
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


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="export")
def main(cfg: DictConfig) -> None:
    try:
        export(cfg)
    except ParityError as error:
        print(f"PARITY CHECK FAILED: {error}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
