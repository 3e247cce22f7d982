"""anomaly-export: exported ONNX / TorchScript files match the eager model, through the real command.

Every method in configs/method/ whose code is present is trained briefly on small generated data
(anomaly-train's job), exported in both formats with a resizing input size, and must pass the command's
own parity check. A perturbed export must fail it; the files must run without the anomaly package.
"""

import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torchvision import tv_tensors

from anomaly.cli.export import export, main
from anomaly.config import config_dir
from anomaly.data.preprocessing import Preprocessing
from anomaly.deploy.export import parity_images
from anomaly.deploy.formats import FORMATS, METADATA_KEY, export_onnx, export_torchscript, load_exported
from anomaly.deploy.parity import parity_batches
from anomaly.deploy.preprocess import ExportedModel, Preprocess
from anomaly.methods.base import AnomalyOutput
from anomaly.model_io import load_model

pytestmark = pytest.mark.slow  # commands and whole runs: seconds to a minute each

METHODS = sorted(p.stem for p in (config_dir() / "method").glob("*.yaml"))
SIZE = 64  # training image side
TRAINING = {  # the fewest steps that give a fitted model; parity does not need a good one
    "simplenet": ["method.max_epochs=1"],
    "efficientad": ["method.max_steps=2", "dataset.calibration_fraction=0.2", "dataset.batch_size=1"],
}
# raw input sizes: both resize passes and a non-square map (64x85), except for PaDiM, whose Gaussians
# are per feature position and so need the training grid
INPUT_SIZES = {"padim": [80, 80]}
NON_SQUARE = [72, 96]
TOLERANCE = {"atol": 1e-4, "rtol": 1e-3}  # configs/export.yaml
# where torchvision resizes uint8 images with its fixed-point kernel, the one the export reproduces
ARCHITECTURE = torch.backends.cpu.get_cpu_capability(), platform.machine()
NATIVE_UINT8_RESIZE = ARCHITECTURE[0] in ("AVX2", "AVX512") or ARCHITECTURE[1] in ("aarch64", "arm64")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small images gain nothing from a second thread, and on a shared CPU a busy core stalls every
    parallel region of a two-thread pool (measured 10x slower under load); the timings do not matter."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def compose_export(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("export", overrides=overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, run_training):
    """``trained(method, *overrides)`` -> run dir of a briefly trained model (each once per module)."""
    runs: dict[tuple[str, ...], Path] = {}

    def train(method: str, *extra: str) -> Path:
        key = (method, *extra)
        if key not in runs:
            pytest.importorskip(f"anomaly.methods.{method}.model")
            folder = tmp_path_factory.mktemp(method)
            overrides = [
                f"method={method}",
                "logger=none",
                f"dataset.image_size={SIZE}",
                "evaluation.num_examples=3",  # the parity images (3); each heatmap figure is ~0.5 s
                *TRAINING.get(method, []),
            ]
            if method == "efficientad":  # any PDN teacher will do for parity: a random one, no distillation
                from anomaly.methods.efficientad.model import patch_description_network

                torch.manual_seed(0)
                torch.save(patch_description_network(384, "small").state_dict(), folder / "teacher.pth")
                overrides.append(f"method.model.teacher_weights={folder / 'teacher.pth'}")
            runs[key] = run_training(folder, [*overrides, *extra])[1]
        return runs[key]

    return train


@pytest.fixture(scope="module")
def exported(trained):
    """``exported(method, fmt)`` -> the command's ExportResult (each pair exported once per module)."""
    results = {}

    def run(method: str, fmt: str):
        if (method, fmt) not in results:
            size = INPUT_SIZES.get(method, NON_SQUARE)
            overrides = [f"model={trained(method)}", f"format={fmt}", f"input_size=[{size[0]},{size[1]}]"]
            results[method, fmt] = export(compose_export([*overrides, "num_parity_images=3"]))
        return results[method, fmt]

    return run


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("method", METHODS)
def test_export_passes_its_parity_check(method, fmt, exported, trained):
    result = exported(method, fmt)
    assert result.path == trained(method) / f"model{FORMATS[fmt]}"
    assert result.path.is_file()
    assert not list(result.path.parent.glob(".*partial"))  # the staging folder is gone
    assert result.parity.failures == 0
    assert "images from the run's test set" in result.parity_images  # its run.json names them
    square = method in INPUT_SIZES
    assert result.output_size == ((SIZE, SIZE) if square else (SIZE, SIZE * NON_SQUARE[1] // NON_SQUARE[0]))
    assert result.input_shape == ["batch", 3, *INPUT_SIZES.get(method, NON_SQUARE)]


def test_patchcore_reweighting_traces_with_a_dynamic_batch(trained):
    """Eq. 7 indexes per image; a traced graph must not freeze the batch size (parity runs 3 and 1)."""
    run_dir = trained("patchcore", "method.model.reweight=true")
    result = export(compose_export([f"model={run_dir}", "format=torchscript", "num_parity_images=3"]))
    assert result.parity.failures == 0


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_tiled_model_exports_with_its_tiling_in_the_graph(trained, fmt):
    """Per-position PaDiM over 2x2 overlapping tiles: splitting and stitching are traced with the model."""
    run_dir = trained("padim", "dataset.image_size=[48,48]", "tiling.tile_size=32", "tiling.stride=16",
                      "tiling.per_position=true")  # fmt: skip
    result = export(compose_export([f"model={run_dir}", f"format={fmt}", "num_parity_images=3"]))
    assert result.parity.failures == 0 and result.output_size == (48, 48)


def test_a_perturbed_export_fails_with_the_differences_and_writes_nothing(
    trained, tmp_path, monkeypatch, capsys
):
    forward = ExportedModel.forward
    monkeypatch.setattr(ExportedModel, "forward", lambda self, x: tuple(1.01 * t for t in forward(self, x)))
    output = tmp_path / "perturbed.pt"
    argv = [f"model={trained('padim')}", "format=torchscript", f"output={output}", "num_parity_images=2"]
    monkeypatch.setattr(sys, "argv", ["anomaly-export", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert "\nError: the exported torchscript model differs from the eager PyTorch model" in error
    assert "Export the other format (format=onnx)" in error and "raise atol/rtol" in error
    assert "anomaly_map max abs diff" in error and "image_score max abs diff" in error
    assert "max rel diff 0.01;" in error  # the 1 % perturbation, measured
    assert list(tmp_path.iterdir()) == []


ONNX_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = sys.modules["anomaly"] = None  # importing either now fails
import numpy as np, onnxruntime
session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
anomaly_map, image_score = session.run(None, {"images": np.load(sys.argv[2])})
np.savez(sys.argv[3], anomaly_map=anomaly_map, image_score=image_score)
print(session.get_modelmeta().custom_metadata_map["anomaly_export"])
"""

TORCHSCRIPT_WITHOUT_ANOMALY = """
import sys
sys.modules["anomaly"] = None  # importing it now fails
import numpy as np, torch
files = {"anomaly_export.json": ""}
model = torch.jit.load(sys.argv[1], _extra_files=files)
with torch.no_grad():
    anomaly_map, image_score = model(torch.from_numpy(np.load(sys.argv[2])))
np.savez(sys.argv[3], anomaly_map=anomaly_map.numpy(), image_score=image_score.numpy())
print(files["anomaly_export.json"].decode())
"""


@pytest.mark.parametrize(
    "fmt, script", [("onnx", ONNX_WITHOUT_TORCH), ("torchscript", TORCHSCRIPT_WITHOUT_ANOMALY)]
)
def test_exported_file_runs_without_the_anomaly_package(fmt, script, exported, trained, tmp_path):
    result = exported("patchcore", fmt)
    images = parity_images(None, 3, tmp_path / "model.safetensors", tuple(NON_SQUARE))[0]
    np.save(tmp_path / "images.npy", images.numpy())
    arguments = [str(result.path), str(tmp_path / "images.npy"), str(tmp_path / "out.npz")]
    process = subprocess.run(
        [sys.executable, "-c", script, *arguments], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert process.returncode == 0, process.stderr
    metadata = json.loads(process.stdout.strip().splitlines()[-1])
    assert metadata["method"] == "patchcore"
    assert metadata["input"] == {
        "name": "images",
        "dtype": "uint8",
        "channels": "RGB",
        "shape": ["batch", 3, 72, 96],
    }

    outputs = np.load(tmp_path / "out.npz")
    loaded = load_model(trained("patchcore"))  # the eager reference, built here independently
    transform = loaded.preprocessing.transform()
    with torch.no_grad():
        expected = loaded.model(torch.stack([transform(tv_tensors.Image(image)) for image in images]))
    np.testing.assert_allclose(outputs["anomaly_map"], expected.anomaly_map.numpy(), **TOLERANCE)
    np.testing.assert_allclose(outputs["image_score"], expected.image_score.numpy(), **TOLERANCE)


PREPROCESSING_CASES = [  # (input H, W), image_size, crop_size
    ((150, 150), 128, None),  # shrink by a non-integer factor
    ((1024, 1024), 256, 224),  # MVTec AD: shrink by 4, centre crop
    ((300, 200), [240, 160], None),  # [h, w] resizes exactly
    ((101, 77), 120, 111),  # enlarge, odd crop offsets
    ((700, 900), 256, None),  # shorter side: 256 x 329
    ((64, 64), 64, None),  # no resize at all
]


@pytest.mark.skipif(not NATIVE_UINT8_RESIZE, reason="torchvision takes its float resize path on this CPU")
@pytest.mark.parametrize("input_size, image_size, crop_size", PREPROCESSING_CASES)
def test_preprocessing_is_bit_exact_with_the_training_transform(input_size, image_size, crop_size):
    images = torch.randint(
        0, 256, (2, 3, *input_size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    transform = Preprocessing(image_size, crop_size).transform()
    expected = torch.stack([transform(tv_tensors.Image(image)) for image in images]).as_subclass(torch.Tensor)
    torch.testing.assert_close(
        Preprocess(input_size, Preprocessing(image_size, crop_size))(images), expected, rtol=0, atol=0
    )


class Passthrough(torch.nn.Module):
    """A "method" whose map is its input: exposes the preprocessing through the export contract."""

    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        return AnomalyOutput(images, images.amax(dim=(1, 2, 3)))


@pytest.mark.skipif(not NATIVE_UINT8_RESIZE, reason="torchvision takes its float resize path on this CPU")
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_preprocessing_graph_is_bit_exact_and_refuses_other_inputs(fmt, tmp_path):
    """Resize (both axes, non-integer scales), an odd centre crop and the scaling, in the exported file."""
    input_size, image_size, crop_size = (93, 130), 71, 63
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 3, *input_size), dtype=torch.uint8, generator=generator)
    module = ExportedModel(Preprocess(input_size, Preprocessing(image_size, crop_size)), Passthrough()).eval()
    path = tmp_path / f"preprocess{FORMATS[fmt]}"
    if fmt == "onnx":
        export_onnx(module, images[:2], path, opset=18, dynamic_batch=True, metadata={})
    else:
        export_torchscript(module, images[:2], path, metadata={})
    run = load_exported(path, fmt, torch.device("cpu"))
    transform = Preprocessing(image_size, crop_size).transform()
    expected = torch.stack([transform(tv_tensors.Image(image)) for image in images]).as_subclass(torch.Tensor)
    torch.testing.assert_close(run(images)[0], expected, rtol=0, atol=0)

    for wrong in (images[:, :, :-1], images.float()):  # another size, or images already scaled to floats
        with pytest.raises(Exception, match=r"(?i)expected|invalid dimensions|data type"):
            run(wrong)


def test_parity_images_fall_back_to_generated_ones_and_resize_files(tmp_path):
    images, description = parity_images(None, 4, tmp_path / "model.safetensors", (40, 56))  # no run.json
    assert description == "generated images"
    assert images.shape == (4, 3, 40, 56) and images.dtype == torch.uint8
    assert images.float().std() > 20  # varied content, not a flat image
    assert not torch.equal(images[0], images[1])

    from PIL import Image

    Image.fromarray(np.zeros((30, 20, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((40, 56), 200, dtype=np.uint8)).save(tmp_path / "b.png")  # grayscale
    images, description = parity_images(tmp_path, 8, tmp_path / "model.safetensors", (40, 56))
    assert description == f"images from {tmp_path}"
    assert images.shape == (2, 3, 40, 56)
    assert images[1].eq(200).all()


def test_parity_batches_cover_a_dynamic_batch_and_fill_a_fixed_one():
    images = torch.arange(5).view(5, 1, 1, 1)
    assert [b.flatten().tolist() for b in parity_batches(images, None)] == [[0, 1, 2, 3, 4], [0]]
    assert [b.flatten().tolist() for b in parity_batches(images, 2)] == [[0, 1], [2, 3], [4, 0]]


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_metadata_names_the_contract(exported):
    result = exported("padim", "torchscript")
    files = {f"{METADATA_KEY}.json": ""}
    torch.jit.load(str(result.path), _extra_files=files)
    metadata = json.loads(files[f"{METADATA_KEY}.json"])
    assert metadata["outputs"]["anomaly_map"] == {"dtype": "float32", "shape": ["batch", 1, SIZE, SIZE]}
    assert metadata["preprocessing"] == {"image_size": SIZE, "crop_size": None, "scale": "1/255"}
