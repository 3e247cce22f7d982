"""Writing a model (with its preprocessing) as one ONNX or TorchScript file, and running such a file."""

import copy
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from anomaly.errors import require

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}  # format -> suffix replacing .safetensors
INPUT_NAME, OUTPUT_NAMES = "images", ("anomaly_map", "image_score")
METADATA_KEY = "anomaly_export"  # ONNX metadata_props key / TorchScript extra file: the JSON contract
MAX_SINGLE_FILE_BYTES = 1.5 * 2**30  # protobuf caps an ONNX file at 2 GiB; more weights go to a .data file
Run = Callable[[Tensor], tuple[Tensor, Tensor]]


def graph_ready(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with the same values in graph-friendly form: the method's own graph-safe
    operations (its contract, e.g. PatchCore's pure-torch k-NN), and in-place activations out of place
    (torch.export decomposes each in-place op under a symbolic batch, ~0.3 s apiece)."""
    model = copy.deepcopy(model)
    model.use_graph_safe_ops()
    for module in model.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    return model


def export_onnx(
    module: nn.Module, example: Tensor, path: Path, opset: int, dynamic_batch: bool, metadata: dict
) -> None:
    """torch.export + the ONNX translation (CPU); the JSON contract goes into ``metadata_props``."""
    purpose, instead = "Exporting to ONNX (format=onnx)", "export with format=torchscript"
    onnx = require("onnx", "onnx", purpose, instead)
    require("onnxscript", "onnxscript", purpose, instead)  # torch.onnx.export's translator

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
        onnxruntime = require("onnxruntime", "onnxruntime", "Running an ONNX file (format=onnx)")

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
