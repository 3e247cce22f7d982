"""``anomaly-distill-teacher``: distil an EfficientAD PDN teacher from a pretrained backbone's features.

The method is :func:`anomaly.methods.efficientad.distill.distill_teacher`; this command turns
``configs/distill.yaml`` into its arguments.
"""

from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from anomaly.cli.runtime import prepare_process, report_user_errors
from anomaly.config import CONFIG_PATH
from anomaly.device import choose_device
from anomaly.methods.efficientad.distill import distill_teacher


def distill(cfg: DictConfig) -> Path:
    """The ``anomaly-distill-teacher`` job: trains (or resumes) the teacher; returns ``cfg.output``."""
    device = choose_device(cfg.device)
    torch.manual_seed(cfg.seed)  # a backbone without pretrained weights is the same random one every run
    output = distill_teacher(
        instantiate(cfg.features), cfg.backbone.name, cfg.image_dir, cfg.output,
        model_size=cfg.model_size, out_channels=cfg.out_channels, image_size=cfg.image_size,
        steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
        grayscale_probability=cfg.grayscale_probability, statistics_images=cfg.statistics_images,
        num_workers=cfg.num_workers, seed=cfg.seed, checkpoint=cfg.checkpoint,
        checkpoint_every=cfg.checkpoint_every, resume=cfg.resume, device=device,
    )  # fmt: skip
    print(f"\nTeacher written to {output} (use method.model.teacher_weights={output.resolve()})", flush=True)
    return output


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="distill")
def main(cfg: DictConfig) -> None:
    prepare_process(num_threads=None)
    report_user_errors(lambda: distill(cfg))


if __name__ == "__main__":
    main()
