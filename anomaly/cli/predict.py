"""``anomaly-predict``: score new images with a fitted model, as on a production line.

The scoring is :func:`anomaly.prediction.predict_folder`; this command turns ``configs/predict.yaml`` into
its arguments, writes into the Hydra run's output dir and prints where the predictions are.
"""

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from anomaly.cli.runtime import backbone_weights_path, prepare_process, report_user_errors
from anomaly.config import CONFIG_PATH
from anomaly.device import choose_device
from anomaly.model_io import load_model
from anomaly.prediction import PredictionResult, predict_folder


def predict(cfg: DictConfig, output_dir: Path) -> Path:
    """The ``anomaly-predict`` job; returns the path of predictions.csv. DataError if nothing scored."""
    device = choose_device(cfg.device)
    model = load_model(cfg.model, device, backbone_weights_path(cfg))
    result = predict_folder(
        model, str(cfg.input), output_dir, threshold=cfg.threshold,
        pixel_threshold=cfg.pixel_threshold, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
        device=device, save_overlays=cfg.save_overlays, drift_alpha=cfg.drift_alpha,
    )  # fmt: skip
    print_summary(result)
    return result.csv_path


def print_summary(result: PredictionResult) -> None:
    anomalous = "" if result.anomalous is None else f", {result.anomalous} above the threshold"
    print(
        f"\nScored {result.scored} images{anomalous} ({result.unreadable} unreadable, {result.not_used} "
        f"not used)\n  wrote {result.csv_path}\n  and {result.summary_path}\n",
        flush=True,
    )


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="predict")
def main(cfg: DictConfig) -> None:
    prepare_process(cfg.reuse_freed_memory)
    report_user_errors(lambda: predict(cfg, Path(HydraConfig.get().runtime.output_dir)))


if __name__ == "__main__":
    main()
