"""``anomaly-export``: a fitted model as one self-contained ONNX or TorchScript file, with parity proven.

The export is :func:`anomaly.deploy.export.export_model`; this command turns ``configs/export.yaml`` into
its arguments and prints what was written. A failed parity check is a user error (ParityError): its
``Error:`` block and exit status 1.
"""

import hydra
from omegaconf import DictConfig, OmegaConf

from anomaly.cli.runtime import backbone_weights_path, prepare_process, report_user_errors
from anomaly.config import CONFIG_PATH
from anomaly.deploy.export import ExportResult, export_model
from anomaly.deploy.formats import INPUT_NAME
from anomaly.device import choose_device


def export(cfg: DictConfig) -> ExportResult:
    """The ``anomaly-export`` job: writes the file only after its parity is shown; else ParityError."""
    values = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    result = export_model(
        values["model"], values["format"], values["output"], values["input_size"], values["batch"],
        values["parity_images"], opset=values["opset"], device=choose_device(values["device"]),
        atol=values["atol"], rtol=values["rtol"], num_parity_images=values["num_parity_images"],
        backbone_weights_path=backbone_weights_path(cfg),
    )  # fmt: skip
    print_summary(cfg, result)
    return result


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


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def main(cfg: DictConfig) -> None:
    prepare_process()
    report_user_errors(lambda: export(cfg))


if __name__ == "__main__":
    main()
