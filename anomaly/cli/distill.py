"""``anomaly-distill-teacher``: distil an EfficientAD PDN teacher from a pretrained backbone's features.

As the paper and its reference ``pretraining.py``: the backbone sees each generic image at twice the PDN's
input size; its mid-level locally aware patch features (:class:`~anomaly.backbones.PatchFeatures`,
pooled to ``out_channels``) are normalised per channel and regressed by the PDN (with padding, so that its
grid is the backbone's stride-8 grid) with an MSE loss and Adam. The result is the PDN's state dict, the
format of the published EfficientAD teacher files, for ``method.model.teacher_weights``.
"""

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from tqdm import tqdm

from anomaly.backbones.feature_extractor import IMAGENET_MEAN, IMAGENET_STD
from anomaly.backbones.patch_features import PatchFeatures
from anomaly.cli.runtime import CONFIG_PATH, prepare_process, report_user_errors
from anomaly.data.dataset import image_folder
from anomaly.errors import ConfigError
from anomaly.methods.efficientad.model import patch_description_network
from anomaly.methods.statistics import ChannelStatistics

log = logging.getLogger(__name__)


class PairTransform:
    """An RGB ``uint8`` image → (backbone input at 2·size, PDN input at size), floats in [0, 1].

    Random grayscale is applied once, to both (reference: p = 0.1).
    """

    def __init__(self, image_size: int, grayscale_probability: float) -> None:
        self.grayscale = v2.RandomGrayscale(grayscale_probability)
        self.large = v2.Resize((2 * image_size, 2 * image_size), antialias=True)
        self.small = v2.Resize((image_size, image_size), antialias=True)

    def __call__(self, image: Tensor) -> tuple[Tensor, Tensor]:
        image = v2.functional.to_dtype(self.grayscale(image), torch.float32, scale=True)
        return self.large(image), self.small(image)


def teacher_targets(features: PatchFeatures, images: Tensor) -> Tensor:
    """``[B, out_channels, h, w]`` patch features of ``[B, 3, 2H, 2W]`` images (h = H/4)."""
    return features(images).permute(0, 3, 1, 2)


def target_statistics(
    features: PatchFeatures, loader: DataLoader, max_images: int, device
) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std ``[1, C, 1, 1]`` of the targets over up to ``max_images`` images."""
    statistics = ChannelStatistics()
    for batch in tqdm(loader, desc="target statistics", leave=False):
        statistics.update(teacher_targets(features, batch["image"][0].to(device)))
        if statistics.images >= max_images:
            break
    mean, std = statistics.compute()
    return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)


def distill(cfg: DictConfig) -> Path:
    """Trains (or resumes) the teacher; writes and returns ``cfg.output``."""
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    features: PatchFeatures = instantiate(cfg.features).to(device)
    if features.dim != cfg.out_channels:
        raise ConfigError(
            f"features.target_embed_dim ({features.dim}) must equal out_channels ({cfg.out_channels})"
        )
    pdn = patch_description_network(cfg.out_channels, cfg.model_size, padding=True).to(device)
    optimizer = torch.optim.Adam(pdn.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    dataset = image_folder(cfg.image_dir, PairTransform(cfg.image_size, cfg.grayscale_probability))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    settings = json.dumps(
        {key: resolved[key] for key in ("model_size", "out_channels", "image_size")}
        | {"backbone": cfg.backbone.name, "layers": resolved["backbone"]["layers"]}
        | {"pre_embed_dim": resolved["features"]["pre_embed_dim"]}
    )

    def loader(seed: int, drop_last: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(
            dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers,
            drop_last=drop_last and len(dataset) >= cfg.batch_size, generator=generator,
        )  # fmt: skip

    checkpoint, step = Path(cfg.checkpoint), 0
    if cfg.resume and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if state["settings"] != settings:
            raise ConfigError(
                f"Checkpoint {checkpoint} was written with settings {state['settings']}, this run has "
                f"{settings}. Pass resume=false to start over, or checkpoint=<another file>."
            )
        pdn.load_state_dict(state["pdn"])
        optimizer.load_state_dict(state["optimizer"])
        mean, std, step = state["target_mean"], state["target_std"], int(state["step"])
        log.info("Resuming from %s at step %d", checkpoint, step)
    else:
        mean, std = target_statistics(features, loader(cfg.seed, False), cfg.statistics_images, device)

    batches = endless(loader(cfg.seed + step, True))  # a resumed run draws a new order
    pdn.train()
    with tqdm(total=cfg.steps, initial=step, desc="distilling teacher") as progress:
        while step < cfg.steps:
            large, small = (part.to(device) for part in next(batches)["image"])
            loss = distillation_step(pdn, optimizer, features, large, small, mean, std, cfg.image_size)
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                state = {"step": step, "pdn": pdn.state_dict(), "optimizer": optimizer.state_dict(),
                         "target_mean": mean, "target_std": std, "settings": settings}  # fmt: skip
                save_atomically(state, checkpoint)

    output = Path(cfg.output)
    save_atomically({key: value.cpu() for key, value in pdn.state_dict().items()}, output)
    log.info("Teacher written to %s (use method.model.teacher_weights=%s)", output, output.resolve())
    return output


def endless(loader: DataLoader) -> Iterator[dict]:
    """The loader's batches, reshuffled at every pass, without end."""
    while True:
        yield from loader


def distillation_step(pdn, optimizer, features, large, small, mean, std, image_size: int) -> float:
    """One MSE step of the PDN on ``small`` images towards the normalised features of ``large`` ones."""
    target = (teacher_targets(features, large) - mean) / std
    prediction = pdn(v2.functional.normalize(small, IMAGENET_MEAN, IMAGENET_STD))
    if prediction.shape != target.shape:
        raise ConfigError(
            f"PDN grid {list(prediction.shape[-2:])} differs from the backbone's "
            f"{list(target.shape[-2:])} at image_size={image_size}: use a multiple of 32."
        )
    loss = ((prediction - target) ** 2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def save_atomically(state: dict, path: Path) -> None:
    """``torch.save`` via a temporary file, so an interrupted run never leaves a truncated file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    temporary.replace(path)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="distill")
def main(cfg: DictConfig) -> None:
    prepare_process(num_threads=None)
    report_user_errors(lambda: distill(cfg))


if __name__ == "__main__":
    main()
