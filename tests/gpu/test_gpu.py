"""On a CUDA GPU: every path runs there, and agrees with the CPU on the same data.

Marked ``gpu`` and skipped without CUDA (CI has none); ``scripts/gpu_check.py`` runs them on a GPU machine
together with the GPU benchmarks. Tolerances: PaDiM and SimpleNet metrics within 0.002 of the CPU's,
PatchCore within 0.005 (its float16 coreset can break near-ties differently), the float32 greedy
selection identical on a small case.
"""

import pytest
import torch

from anomaly.methods.patchcore.coreset import greedy_k_center, random_projection

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")


def metrics_on(device: str, run_training, tmp_path, overrides: list[str]) -> dict:
    accelerator = "gpu" if device == "cuda" else "cpu"
    return run_training(tmp_path / device, [*overrides, f"trainer.accelerator={accelerator}", "logger=none"])[
        0
    ]


@pytest.mark.parametrize(
    ("method", "tolerance", "extra"),
    [
        ("padim", 0.002, []),
        ("patchcore", 0.005, []),
        ("simplenet", 0.002, ["method.max_epochs=3"]),
    ],
)
def test_gpu_metrics_agree_with_the_cpu(method, tolerance, extra, run_training, tmp_path):
    overrides = [f"method={method}", *extra]
    cpu, gpu = (metrics_on(device, run_training, tmp_path, overrides) for device in ("cpu", "cuda"))
    for key in METRICS:
        assert gpu[key] == pytest.approx(cpu[key], abs=tolerance), (key, cpu[key], gpu[key])


def test_gpu_greedy_selection_equals_the_cpu_one_in_float32():
    features = torch.randn(5000, 64, generator=torch.Generator().manual_seed(0)) * 3
    points = random_projection(features, 32, torch.Generator().manual_seed(1), torch.float32)
    starts = torch.arange(10)
    on_cpu = greedy_k_center(points, 300, starts)  # pruned, as on the CPU by default
    on_gpu = greedy_k_center(points.cuda(), 300, starts.cuda())  # full passes, no host synchronisation
    assert torch.equal(on_cpu, on_gpu.cpu())


def test_reduced_precision_backbone_keeps_padim_metrics(run_training, tmp_path):
    exact = metrics_on("cuda", run_training, tmp_path / "fp32", ["method=padim"])
    reduced = metrics_on(
        "cuda", run_training, tmp_path / "bf16", ["method=padim", "backbone.precision=bfloat16"]
    )
    for key in METRICS:
        assert reduced[key] == pytest.approx(exact[key], abs=0.002), (key, exact[key], reduced[key])


def test_efficientad_distill_predict_and_export_run_on_the_gpu(run_training, tmp_path):
    from hydra import compose, initialize_config_dir

    from anomaly.cli.distill import distill
    from anomaly.cli.export import export
    from anomaly.cli.predict import predict
    from anomaly.config import config_dir
    from anomaly.data.synthetic import generate_dataset

    generate_dataset(tmp_path / "images", ["tile"], n_train=6, n_test_good=1, n_test_defect=1, image_size=64)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        distill_cfg = compose("distill", overrides=[
            f"image_dir={tmp_path / 'images' / 'tile' / 'train'}", f"output={tmp_path / 'teacher.pth'}",
            "image_size=64", "batch_size=2", "statistics_images=6", "num_workers=0", "steps=3",
        ])  # fmt: skip
    teacher = distill(distill_cfg)
    metrics, run_dir = run_training(tmp_path, [
        "method=efficientad", f"method.model.teacher_weights={teacher}", "method.max_steps=10",
        "dataset.calibration_fraction=0.2", "dataset.image_size=64", "trainer.accelerator=gpu", "logger=none",
    ])  # fmt: skip
    assert 0.0 <= metrics["image_auroc"] <= 1.0
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        images = f"input={tmp_path / 'images'}/**/*.png"
        predict_cfg = compose("predict", [f"model={run_dir}", images, "device=cuda", "num_workers=0"])
        export_cfg = compose(
            "export", [f"model={run_dir}", "format=torchscript", "device=cuda", "num_parity_images=2"]
        )
    assert predict(predict_cfg, tmp_path / "predictions").is_file()
    assert export(export_cfg).parity.failures == 0
