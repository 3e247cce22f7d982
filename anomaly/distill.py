"""``anomaly-distill-teacher``: distil an EfficientAD PDN teacher from a pretrained backbone's features.

As the paper and its reference ``pretraining.py``: the backbone sees each generic image at twice the PDN's
input size; its mid-level features, aggregated as PatchCore does (3×3 neighbourhoods, the deeper layer
upsampled to the finer grid, adaptive average pooling to ``pre_embed_dim`` per layer and to
``out_channels`` overall), are normalised per channel and regressed by the PDN (with padding, so that
its grid is the backbone's stride-8 grid) with an MSE loss and Adam. The result is the PDN's state dict,
the format of the published EfficientAD teacher files, for ``method.model.teacher_weights``.
"""

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from tqdm import tqdm

from anomaly.methods.efficientad.model import IMAGENET_MEAN, IMAGENET_STD, patch_description_network
from anomaly.methods.efficientad.module import ImageFolderDataset, forever
from anomaly.methods.patchcore.model import aggregate_patch_features
from anomaly.train import CONFIG_DIR

log = logging.getLogger(__name__)
PATCH_SIZE = 3  # PatchCore's neighbourhood, as the reference distillation


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


@torch.no_grad()
def backbone_targets(backbone: nn.Module, images: Tensor, pre_embed_dim: int, out_channels: int) -> Tensor:
    """``[B, out_channels, h, w]`` locally aware patch features of ``[B, 3, 2H, 2W]`` images (h = H/4)."""
    feature_maps = list(backbone(images).values())
    features = aggregate_patch_features(feature_maps, PATCH_SIZE, pre_embed_dim, out_channels)
    return features.permute(0, 3, 1, 2)


def target_statistics(
    batches: Iterable[Tensor], backbone: nn.Module, pre_embed_dim: int, out_channels: int, max_images: int
) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std ``[1, C, 1, 1]`` of the targets over up to ``max_images`` images."""
    total = squares = None
    count = images_seen = 0
    for images in tqdm(batches, desc="target statistics", leave=False):
        targets = backbone_targets(backbone, images, pre_embed_dim, out_channels).double()
        batch_sum, batch_squares = targets.sum(dim=(0, 2, 3)), (targets**2).sum(dim=(0, 2, 3))
        total = batch_sum if total is None else total + batch_sum
        squares = batch_squares if squares is None else squares + batch_squares
        count += targets.numel() // targets.shape[1]
        images_seen += len(images)
        if images_seen >= max_images:
            break
    mean = total / count
    std = (squares / count - mean**2).clamp_min(0).sqrt()
    return mean.float().view(1, -1, 1, 1), std.float().view(1, -1, 1, 1)


def distill(cfg: DictConfig) -> Path:
    """Trains (or resumes) the teacher; writes and returns ``cfg.output``."""
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backbone = instantiate(cfg.backbone, layers=list(cfg.layers)).to(device)
    pdn = patch_description_network(cfg.out_channels, cfg.model_size, padding=True).to(device)
    optimizer = torch.optim.Adam(pdn.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    dataset = ImageFolderDataset(cfg.image_dir, PairTransform(cfg.image_size, cfg.grayscale_probability))
    resolved = OmegaConf.to_container(cfg, resolve=True)
    keys = ("model_size", "out_channels", "image_size", "layers", "pre_embed_dim")
    settings = json.dumps({key: resolved[key] for key in keys} | {"backbone": cfg.backbone.name})

    checkpoint, step = Path(cfg.checkpoint), 0
    if cfg.resume and checkpoint.is_file():
        state = torch.load(checkpoint, map_location=device, weights_only=True)
        if state["settings"] != settings:
            raise ValueError(
                f"Checkpoint {checkpoint} was written with settings {state['settings']}, this run has "
                f"{settings}. Pass resume=false to start over, or checkpoint=<another file>."
            )
        pdn.load_state_dict(state["pdn"])
        optimizer.load_state_dict(state["optimizer"])
        mean, std, step = state["target_mean"], state["target_std"], int(state["step"])
        log.info("Resuming from %s at step %d", checkpoint, step)
    else:
        generator = torch.Generator().manual_seed(cfg.seed)
        loader = DataLoader(
            dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers, generator=generator
        )
        large_images = (large.to(device) for large, _ in loader)
        mean, std = target_statistics(
            large_images, backbone, cfg.pre_embed_dim, cfg.out_channels, cfg.statistics_images
        )

    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=cfg.num_workers,
        drop_last=len(dataset) >= cfg.batch_size,
        generator=torch.Generator().manual_seed(cfg.seed + step),  # a resumed run draws a new order
    )
    batches = forever(loader)
    pdn.train()
    with tqdm(total=cfg.steps, initial=step, desc="distilling teacher") as progress:
        while step < cfg.steps:
            large, small = (images.to(device) for images in next(batches))
            target = (backbone_targets(backbone, large, cfg.pre_embed_dim, cfg.out_channels) - mean) / std
            prediction = pdn(v2.functional.normalize(small, IMAGENET_MEAN, IMAGENET_STD))
            if prediction.shape != target.shape:
                raise ValueError(
                    f"PDN grid {list(prediction.shape[-2:])} differs from the backbone's "
                    f"{list(target.shape[-2:])} at image_size={cfg.image_size}: use a multiple of 32."
                )
            loss = ((prediction - target) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                state = {
                    "step": step,
                    "pdn": pdn.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "target_mean": mean,
                    "target_std": std,
                    "settings": settings,
                }
                save_atomically(state, checkpoint)

    output = Path(cfg.output)
    save_atomically({key: value.cpu() for key, value in pdn.state_dict().items()}, output)
    log.info("Teacher written to %s (use method.model.teacher_weights=%s)", output, output.resolve())
    return output


def save_atomically(state: dict, path: Path) -> None:
    """``torch.save`` via a temporary file, so an interrupted run never leaves a truncated file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    temporary.replace(path)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="distill")
def main(cfg: DictConfig) -> None:
    distill(cfg)


if __name__ == "__main__":
    main()
