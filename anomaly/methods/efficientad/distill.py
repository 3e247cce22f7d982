"""Distilling an EfficientAD PDN teacher from a pretrained backbone's features over generic images.

As the paper and its reference ``pretraining.py``: the backbone sees each image at twice the PDN's input
size; its mid-level locally aware patch features (:class:`~anomaly.backbones.PatchFeatures`, pooled to
``out_channels``) are normalised per channel and regressed by the PDN (with padding, so that its grid is
the backbone's stride-8 grid) with an MSE loss and Adam. The result is the PDN's state dict, the format of
the published EfficientAD teacher files, for ``EfficientAD(teacher_weights=...)``.
"""

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from anomaly.backbones.feature_extractor import IMAGENET_MEAN, IMAGENET_STD
from anomaly.backbones.patch_features import PatchFeatures
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


def distill_teacher(
    features: PatchFeatures,
    backbone_name: str,
    image_dir: str | Path,
    output: str | Path,
    *,
    model_size: str,
    out_channels: int,
    image_size: int,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    grayscale_probability: float,
    statistics_images: int,
    num_workers: int,
    seed: int,
    checkpoint: str | Path,
    checkpoint_every: int,
    resume: bool,
    device: torch.device,
) -> Path:
    """Trains (or resumes from ``checkpoint``) the PDN on the images under ``image_dir``; writes its state
    dict to ``output`` and returns that path.

    ``features`` (over ``backbone_name``) give the targets; a checkpoint resumes only when it was written
    with the same backbone, layers, pooling, model size, channels and image size.
    """
    if features.dim != out_channels:
        raise ConfigError(
            f"features.target_embed_dim ({features.dim}) must equal out_channels ({out_channels})"
        )
    features = features.to(device)
    torch.manual_seed(seed)
    pdn = patch_description_network(out_channels, model_size, padding=True).to(device)
    optimizer = torch.optim.Adam(pdn.parameters(), lr=lr, weight_decay=weight_decay)
    dataset = image_folder(image_dir, PairTransform(image_size, grayscale_probability))
    settings = json.dumps(
        {"model_size": model_size, "out_channels": out_channels, "image_size": image_size}
        | {"backbone": backbone_name, "layers": list(features.backbone.layers)}
        | {"pre_embed_dim": features.pre_embed_dim}
    )

    checkpoint, step = Path(checkpoint), 0
    if resume and checkpoint.is_file():
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
        loader = shuffled_loader(dataset, batch_size, num_workers, seed, drop_last=False)
        mean, std = target_statistics(features, loader, statistics_images, device)

    # a resumed run draws a new order
    batches = endless(shuffled_loader(dataset, batch_size, num_workers, seed + step, drop_last=True))
    pdn.train()
    with tqdm(total=steps, initial=step, desc="distilling teacher") as progress:
        while step < steps:
            large, small = (part.to(device) for part in next(batches)["image"])
            loss = distillation_step(pdn, optimizer, features, large, small, mean, std)
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}")
            if step % checkpoint_every == 0 or step == steps:
                state = {"step": step, "pdn": pdn.state_dict(), "optimizer": optimizer.state_dict(),
                         "target_mean": mean, "target_std": std, "settings": settings}  # fmt: skip
                save_atomically(state, checkpoint)

    output = Path(output)
    save_atomically({key: value.cpu() for key, value in pdn.state_dict().items()}, output)
    return output


def shuffled_loader(
    dataset: Dataset, batch_size: int, num_workers: int, seed: int, drop_last: bool
) -> DataLoader:
    """Batches in a seeded random order; ``drop_last`` keeps every batch full unless the data is smaller."""
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers,
        drop_last=drop_last and len(dataset) >= batch_size, generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip


def teacher_targets(features: PatchFeatures, images: Tensor) -> Tensor:
    """``[B, out_channels, h, w]`` patch features of ``[B, 3, 2H, 2W]`` images (h = H/4)."""
    return features(images).permute(0, 3, 1, 2)


def target_statistics(
    features: PatchFeatures, loader: DataLoader, max_images: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std ``[1, C, 1, 1]`` of the targets over up to ``max_images`` images."""
    statistics = ChannelStatistics()
    for batch in tqdm(loader, desc="target statistics", leave=False):
        statistics.update(teacher_targets(features, batch["image"][0].to(device)))
        if statistics.images >= max_images:
            break
    mean, std = statistics.compute()
    return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)


def endless(loader: DataLoader) -> Iterator[dict]:
    """The loader's batches, reshuffled at every pass, without end."""
    while True:
        yield from loader


def distillation_step(
    pdn: nn.Module,
    optimizer: torch.optim.Optimizer,
    features: PatchFeatures,
    large: Tensor,
    small: Tensor,
    mean: Tensor,
    std: Tensor,
) -> float:
    """One MSE step of the PDN on ``small`` images ``[B, 3, H, W]`` towards the normalised features of the
    same images at twice the size (``large``); ``mean`` and ``std`` are ``[1, C, 1, 1]``."""
    target = (teacher_targets(features, large) - mean) / std
    prediction = pdn(v2.functional.normalize(small, IMAGENET_MEAN, IMAGENET_STD))
    if prediction.shape != target.shape:
        raise ConfigError(
            f"PDN grid {list(prediction.shape[-2:])} differs from the backbone's "
            f"{list(target.shape[-2:])} at image_size={small.shape[-1]}: use a multiple of 32."
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
