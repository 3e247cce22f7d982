"""Lightning glue for SimpleNet: the official code's two optimisers, built from plain config values."""

import torch

from anomaly.methods.lightning import TrainedModule
from anomaly.methods.simplenet.model import SimpleNet


class SimpleNetModule(TrainedModule):
    """Trains the adaptor with AdamW and the discriminator with Adam, both stepped once per batch.

    Official values: adaptor AdamW at lr 1e-4 (its ``lr * .1`` with lr = 1e-3) and torch's default
    weight decay 0.01; discriminator Adam at lr 2e-4, weight decay 1e-5; no schedule (``cos_lr`` is off
    in the official run script).
    """

    def __init__(
        self,
        model: SimpleNet,
        adaptor_lr: float = 1e-4,
        adaptor_weight_decay: float = 0.01,
        discriminator_lr: float = 2e-4,
        discriminator_weight_decay: float = 1e-5,
    ) -> None:
        super().__init__(model)
        self.adaptor_lr = adaptor_lr
        self.adaptor_weight_decay = adaptor_weight_decay
        self.discriminator_lr = discriminator_lr
        self.discriminator_weight_decay = discriminator_weight_decay

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        network = self.model.trained_model  # the model itself, or the one a tiling shares
        return [
            torch.optim.AdamW(
                network.adaptor.parameters(), lr=self.adaptor_lr, weight_decay=self.adaptor_weight_decay
            ),
            torch.optim.Adam(
                network.discriminator.parameters(),
                lr=self.discriminator_lr,
                weight_decay=self.discriminator_weight_decay,
            ),
        ]
