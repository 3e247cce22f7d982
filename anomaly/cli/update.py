"""``anomaly-update``: teach a fitted model newly approved good parts, without refitting it.

The update is :func:`anomaly.updating.update_model`; this command turns ``configs/update.yaml`` into its
arguments and prints what was written.
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from anomaly.backbones.feature_cache import FeatureCache
from anomaly.cli.runtime import backbone_weights_path, prepare_process, report_user_errors
from anomaly.config import CONFIG_PATH
from anomaly.data.samples import describe_skipped
from anomaly.device import choose_device
from anomaly.methods.base import RunResources
from anomaly.updating import update_model


def update(cfg: DictConfig) -> Path:
    """Writes and returns the updated model file."""
    cache = FeatureCache.open(cfg.cache_dir, cfg.cache_max_gb) if cfg.cache else None
    result = update_model(
        cfg.model, cfg.input, cfg.output, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
        device=choose_device(cfg.device), resources=RunResources(cfg.spill_dir, cache),
        backbone_weights_path=backbone_weights_path(cfg),
    )  # fmt: skip
    not_used = f"\n  {describe_skipped(result.skipped)}" if result.skipped else ""
    print(f"\nAdded {result.added_images} good images to {result.parent}{not_used}\n  wrote {result.output}",
          flush=True)  # fmt: skip
    if result.calibration is not None:
        print(f"  {result.calibration.describe()}", flush=True)
    if cache is not None:
        print(f"  feature cache {cache.store.root}: {cache.read} images read, {cache.computed} computed",
              flush=True)  # fmt: skip
    return result.output


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="update")
def main(cfg: DictConfig) -> None:
    prepare_process(cfg.reuse_freed_memory)
    report_user_errors(lambda: update(cfg))


if __name__ == "__main__":
    main()
