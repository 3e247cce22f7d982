"""Lightning glue for EfficientAD: the paper's optimiser and schedule, and the statistics it needs.

Before the first step the teacher's per-channel mean and std are taken over the training images. The
map quantiles are taken on the datamodule's validation split, which holds *normal training* images only
(``dataset.val_fraction``), when the validation loop starts; the method config makes Lightning validate
once, after the last step (``trainer.val_check_interval = max_steps``), so the quantiles, and the
decision threshold that the shared validation step then calibrates on the normalised scores, belong to
the final model. The test set is never touched while fitting.
"""

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from anomaly.data.samples import IMAGE_EXTENSIONS, read_image
from anomaly.errors import DataError
from anomaly.methods.efficientad.model import EfficientAD
from anomaly.methods.lightning import TrainedModule


class ImageFolderDataset(Dataset):
    """Every image under ``root`` (recursively, sorted) as a ``[3, H, W]`` float tensor in [0, 1].

    For the paper's penalty images (ImageNet) and the teacher distillation; ``transform`` maps the
    ``uint8`` tensor of an RGB image to what the caller needs.
    """

    def __init__(self, root: str | Path, transform: v2.Transform) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"Image folder {root} does not exist: pass a folder of generic images.")
        files = (p for p in root.rglob("*") if p.is_file())
        self.paths = sorted(p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not self.paths:
            raise DataError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {root}.")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        return self.transform(read_image(self.paths[index]))


def penalty_transform(image_size: tuple[int, int]) -> v2.Compose:
    """The reference's penalty-image transform: resize to twice the size, 30 % grayscale, centre crop."""
    height, width = image_size
    return v2.Compose(
        [
            v2.Resize((2 * height, 2 * width), antialias=True),
            v2.RandomGrayscale(0.3),
            v2.CenterCrop((height, width)),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def forever(loader: DataLoader) -> Iterator:
    """Batches of ``loader``, reshuffled at every pass, without end."""
    while True:
        yield from loader


@torch.no_grad()
def teacher_channel_statistics(model: EfficientAD, batches: Iterable[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std ``[C]`` of the teacher's outputs over all positions of all images.

    One pass with float64 sums (the reference takes two passes; the result is the same).
    """
    total = squares = None
    count = 0
    for images in batches:
        features = model.teacher_features(images).double()  # [B, C, h, w]
        batch_sum, batch_squares = features.sum(dim=(0, 2, 3)), (features**2).sum(dim=(0, 2, 3))
        total = batch_sum if total is None else total + batch_sum
        squares = batch_squares if squares is None else squares + batch_squares
        count += features.numel() // features.shape[1]
    if count == 0:
        raise DataError("EfficientAD normalises its teacher on the training images: there are none.")
    mean = total / count
    return mean.float(), (squares / count - mean**2).clamp_min(0).sqrt().float()


@torch.no_grad()
def map_quantiles(model: EfficientAD, batches: Iterable[Tensor]) -> tuple[Tensor, Tensor]:
    """``([2], [2])``: (q_a, q_b) of the raw ST and AE maps over the given (normal) images."""
    maps = [model.raw_maps(images) for images in batches]
    return (
        model.map_quantiles(torch.cat([st for st, _ in maps])),
        model.map_quantiles(torch.cat([ae for _, ae in maps])),
    )


class EfficientADModule(TrainedModule):
    """Adam over student and autoencoder, LR × 0.1 after ``lr_step_fraction`` of ``max_steps`` (StepLR).

    ``penalty_image_dir``: a folder of generic images (the paper: ImageNet) for the student's penalty
    loss; ``None`` turns the penalty off.
    """

    def __init__(
        self,
        model: EfficientAD,
        lr: float = 1e-4,
        weight_decay: float = 1e-5,
        max_steps: int = 70000,
        lr_step_fraction: float = 0.95,
        penalty_image_dir: str | None = None,
        num_examples: int = 8,
        threshold_quantile: float = 0.99,
    ) -> None:
        super().__init__(model, num_examples, threshold_quantile)
        model.load_teacher_weights()  # fails here, before any data is read, naming both ways to a teacher
        if max_steps < 1:
            raise ValueError(f"max_steps must be positive, got {max_steps}")
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_steps = max_steps
        self.lr_step_fraction = lr_step_fraction
        self.penalty_image_dir = penalty_image_dir
        self._penalty_batches: Iterator[Tensor] | None = None

    def configure_optimizers(self) -> dict:
        parameters = itertools.chain(self.model.student.parameters(), self.model.autoencoder.parameters())
        optimizer = torch.optim.Adam(parameters, lr=self.lr, weight_decay=self.weight_decay)
        step_size = max(1, int(self.lr_step_fraction * self.max_steps))
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size, gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def on_train_start(self) -> None:
        datamodule = self.trainer.datamodule
        if not datamodule.val_samples:
            raise DataError(
                "EfficientAD normalises its maps with quantiles of held-out normal training images, but the "
                "validation split is empty: set dataset.val_fraction > 0 (the method config sets 0.1; "
                "with few training images make sure round(n_train * val_fraction) >= 1)."
            )
        train_loader = datamodule.train_dataloader()
        images = (batch["image"].to(self.device) for batch in train_loader)
        self.model.set_teacher_normalisation(*teacher_channel_statistics(self.model, images))
        if self.penalty_image_dir is not None:
            image_size = tuple(train_loader.dataset[0]["image"].shape[-2:])
            penalty = ImageFolderDataset(self.penalty_image_dir, penalty_transform(image_size))
            loader = DataLoader(
                penalty,
                batch_size=datamodule.batch_size,
                shuffle=True,
                num_workers=datamodule.num_workers,
                generator=torch.Generator().manual_seed(datamodule.seed),
            )
            self._penalty_batches = forever(loader)

    def training_losses(self, batch: dict) -> dict[str, Tensor]:
        """The paper's loss; with a penalty folder, on a batch of its images too."""
        penalty_images = None
        if self._penalty_batches is not None:
            penalty_images = next(self._penalty_batches).to(self.device)
        return self.model.training_loss(batch["image"], penalty_images)

    def on_validation_epoch_start(self) -> None:
        """Map quantiles from the normal validation images; the shared validation step then scores them."""
        val_images = (batch["image"].to(self.device) for batch in self.trainer.datamodule.val_dataloader())
        self.model.set_map_quantiles(*map_quantiles(self.model, val_images))

    def on_train_end(self) -> None:
        self._penalty_batches = None
        if not self.model.is_fitted:
            raise RuntimeError(
                "EfficientAD's map quantiles are taken when Lightning validates, and it never did: keep "
                "trainer.val_check_interval=${method.max_steps} and trainer.check_val_every_n_epoch=null "
                "(configs/method/efficientad.yaml) and a non-empty validation split."
            )
