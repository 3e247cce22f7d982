"""Thin Lightning glue for the two contracts of :mod:`anomaly.methods.base`.

The pure torch model does the work; these modules only feed it batches. :class:`FitOnceModule` serves
every fit-once method and :class:`TrainedModule` every trained one (a method's own module only names its
optimisers). Scoring is shared: ``predict_step`` scores images (``anomaly-train`` calibrates its
threshold on normal images this way, after fitting), ``test_step`` collects the test metrics.
"""

import pytorch_lightning as pl
import torch
from torch import Tensor

from anomaly.methods.base import AnomalyModel, FitOnceModel, TrainedModel
from anomaly.metrics import Evaluator


class AnomalyModule(pl.LightningModule):
    """Scores images; :attr:`test_metrics` and :attr:`examples` are read by the entry point afterwards.

    Before testing, the entry point sets :attr:`threshold` and :attr:`pixel_threshold` (calibrated on
    normal images, or None), :attr:`example_ids` (test-set positions kept for heatmaps),
    :attr:`pixel_metrics` and :attr:`aupro_fpr_limit`.
    """

    def __init__(self, model: AnomalyModel, num_examples: int = 8) -> None:
        super().__init__()
        self.model = model
        self.num_examples = num_examples
        self.threshold: float | None = None
        self.pixel_threshold: float | None = None
        self.aupro_fpr_limit = 0.3
        self.example_ids: set[int] = set()
        self.pixel_metrics = True
        self.test_metrics: dict[str, float] = {}
        self.examples: list[dict] = []
        self._evaluator: Evaluator | None = None
        self._seen = 0

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        """Image scores ``[B]`` and each map's maximum ``[B]``, on the CPU (what calibration needs)."""
        output = self.model(batch["image"])
        return {
            "image_score": output.image_score.float().cpu(),
            "map_max": output.anomaly_map.amax(dim=(1, 2, 3)).float().cpu(),
        }

    def on_test_start(self) -> None:
        self._evaluator = Evaluator(self.pixel_metrics, self.aupro_fpr_limit)
        self.examples, self._seen = [], 0

    def test_step(self, batch: dict, batch_idx: int) -> None:
        output = self.model(batch["image"])
        self._evaluator.update(output.image_score, batch["label"], output.anomaly_map, batch["mask"])
        for i in range(len(output.image_score)):
            if self._seen + i in self.example_ids:
                self.examples.append(
                    {
                        "image": batch["image"][i].cpu(),
                        "mask": batch["mask"][i].cpu(),
                        "anomaly_map": output.anomaly_map[i].float().cpu(),
                        "score": float(output.image_score[i]),
                        "label": int(batch["label"][i]),
                        "path": batch["path"][i],
                    }
                )
        self._seen += len(output.image_score)

    def on_test_epoch_end(self) -> None:
        self.test_metrics = self._evaluator.compute(self.threshold, self.pixel_threshold)
        self._evaluator = None
        self.log_dict({f"test/{k}": v for k, v in self.test_metrics.items()})


class FitOnceModule(AnomalyModule):
    """Feeds every training batch to ``model.collect`` for one epoch, then calls ``model.fit`` once."""

    def __init__(self, model: FitOnceModel, num_examples: int = 8) -> None:
        super().__init__(model, num_examples)
        self.automatic_optimization = False

    def on_train_epoch_start(self) -> None:
        if self.model.is_fitted:
            raise RuntimeError("This method fits in one epoch: set trainer.max_epochs=1.")

    def training_step(self, batch: dict, batch_idx: int) -> None:
        with torch.no_grad():
            self.model.collect(batch["image"])

    def on_train_epoch_end(self) -> None:
        self.model.fit()

    def configure_optimizers(self) -> list:
        return []  # nothing is optimised


class TrainedModule(AnomalyModule):
    """Optimises ``model.training_loss(images)`` (a dict with the total under ``"loss"``).

    ``model.prepare`` gets the training images before the first step and ``model.finalize`` the held-out
    normal images (the data module's ``calibration_dataloader``) after the last. Manual optimisation, so
    methods with several optimisers (SimpleNet: adaptor and discriminator) need no special casing: every
    optimiser and scheduler that ``configure_optimizers`` returns is stepped once per batch.
    """

    def __init__(self, model: TrainedModel, num_examples: int = 8) -> None:
        super().__init__(model, num_examples)
        self.automatic_optimization = False

    def on_train_start(self) -> None:
        with torch.no_grad(), self.trainer.precision_plugin.forward_context():
            self.model.prepare(self._images(self.trainer.datamodule.train_dataloader()))

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        losses = self.training_losses(batch)
        for optimizer in optimizers:
            optimizer.zero_grad()
        self.manual_backward(losses["loss"])
        for optimizer in optimizers:
            optimizer.step()
        schedulers = self.lr_schedulers() or []
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
            scheduler.step()
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, prog_bar=True)
        return losses["loss"]

    def training_losses(self, batch: dict) -> dict[str, Tensor]:
        """The losses of one batch; a method whose loss needs more than the batch's images overrides this."""
        return self.model.training_loss(batch["image"])

    def on_train_end(self) -> None:
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad(), self.trainer.precision_plugin.forward_context():
            self.model.finalize(self._images(self.trainer.datamodule.calibration_dataloader()))
        self.model.train(was_training)

    def _images(self, loader) -> object:
        """The images of ``loader``'s batches, on this module's device."""
        return (batch["image"].to(self.device) for batch in loader)
