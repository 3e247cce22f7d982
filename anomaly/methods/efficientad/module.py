"""Lightning glue for EfficientAD: the paper's optimiser and schedule, and its penalty images."""

import itertools
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from torchvision.transforms import v2

from anomaly.data.dataset import endless_image_batches
from anomaly.errors import ConfigError
from anomaly.methods.efficientad.model import TEACHER_HELP, EfficientAD
from anomaly.methods.lightning import TrainedModule


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


class EfficientADModule(TrainedModule):
    """Adam over student and autoencoder, LR × 0.1 after ``lr_step_fraction`` of ``max_steps`` (StepLR).

    ``penalty_image_dir``: a folder of generic images (the paper: ImageNet) for the student's penalty
    loss, drawn at the training images' size; ``None`` turns the penalty off.
    """

    def __init__(
        self,
        model: EfficientAD,
        lr: float = 1e-4,
        weight_decay: float = 1e-5,
        max_steps: int = 70000,
        lr_step_fraction: float = 0.95,
        penalty_image_dir: str | None = None,
    ) -> None:
        super().__init__(model)
        if not model.trained_model.teacher_loaded:  # here, before any data is read
            raise ConfigError(TEACHER_HELP)
        if max_steps < 1:
            raise ConfigError(f"max_steps must be positive, got {max_steps}")
        if penalty_image_dir is not None and not Path(penalty_image_dir).is_dir():
            raise ConfigError(f"penalty_image_dir {penalty_image_dir} is not a folder of images.")
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_steps = max_steps
        self.lr_step_fraction = lr_step_fraction
        self.penalty_image_dir = penalty_image_dir
        self._penalty_batches: Iterator[Tensor] | None = None

    def configure_optimizers(self) -> dict:
        network = self.model.trained_model  # the model itself, or the one a tiling shares
        parameters = itertools.chain(network.student.parameters(), network.autoencoder.parameters())
        optimizer = torch.optim.Adam(parameters, lr=self.lr, weight_decay=self.weight_decay)
        step_size = max(1, int(self.lr_step_fraction * self.max_steps))
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size, gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def training_losses(self, batch: dict) -> dict[str, Tensor]:
        """The paper's loss; with a penalty folder, on a batch of its images (at this batch's size) too."""
        images = batch["image"]
        if self.penalty_image_dir is None:
            return self.model.training_loss(images)
        if self._penalty_batches is None:
            datamodule = self.trainer.datamodule
            self._penalty_batches = endless_image_batches(
                self.penalty_image_dir, penalty_transform(tuple(images.shape[-2:])), datamodule.batch_size,
                datamodule.num_workers, datamodule.seed,
            )  # fmt: skip
        return self.model.training_loss(images, next(self._penalty_batches).to(self.device))

    def on_train_end(self) -> None:
        self._penalty_batches = None
        super().on_train_end()
