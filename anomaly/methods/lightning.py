"""Thin Lightning glue shared by all methods: scoring the test set, and fitting fit-once methods.

The pure torch model does the work; these modules only feed it batches, collect metrics and keep a
few examples for heatmaps. Trained methods add their own module with ``training_step`` and
optimisers on top of :class:`AnomalyModule`.
"""

import logging

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from anomaly.calibration import Calibration, fit_calibration
from anomaly.methods.base import FitOnceModel
from anomaly.metrics import Evaluator

log = logging.getLogger(__name__)


class AnomalyModule(pl.LightningModule):
    """Scores the test set; ``test_metrics`` and ``examples`` are read by the entry point afterwards."""

    def __init__(self, model: nn.Module, num_examples: int = 8, threshold_quantile: float = 0.99) -> None:
        super().__init__()
        self.model = model
        self.num_examples = num_examples
        self.threshold_quantile = threshold_quantile
        self.calibration: Calibration | None = None
        self._validation_scores: list[Tensor] = []
        self.evaluator: Evaluator | None = None
        self.test_metrics: dict[str, float] = {}
        self.examples: list[dict] = []
        self._example_ids: set[int] = set()
        self._seen = 0

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Scores normal validation images; their scores calibrate the threshold (never the test set)."""
        self._validation_scores.append(self.model(batch["image"]).image_score.detach().float().cpu())

    def on_validation_epoch_end(self) -> None:
        scores = torch.cat(self._validation_scores) if self._validation_scores else torch.empty(0)
        self._validation_scores = []
        if len(scores) < 2:
            count = len(scores)
            log.warning("Only %d validation image(s): no threshold; raise dataset.val_fraction", count)
            return
        self.calibration = fit_calibration(scores, self.threshold_quantile)
        self.log("val/threshold", self.calibration.threshold)

    def on_test_start(self) -> None:
        datamodule = self.trainer.datamodule
        labels = {sample.label for sample in datamodule.test_samples}
        self._image_metrics = labels == {0, 1}
        if not self._image_metrics:
            log.warning("Test set has only %s images: image and pixel metrics are skipped.", labels)
        pixel = self._image_metrics and datamodule.has_pixel_ground_truth()
        if self._image_metrics and not pixel:
            log.warning("Not every defective test image has a mask: pixel metrics are skipped.")
        self.evaluator = Evaluator(compute_pixel_metrics=pixel)
        total = len(datamodule.test_samples)
        count = min(self.num_examples, total)
        self._example_ids = {round(i * (total - 1) / max(count - 1, 1)) for i in range(count)}
        self.examples, self._seen = [], 0

    def test_step(self, batch: dict, batch_idx: int) -> None:
        output = self.model(batch["image"])
        if self._image_metrics:
            self.evaluator.update(output.image_score, batch["label"], output.anomaly_map, batch["mask"])
        self._keep_examples(batch, output.anomaly_map, output.image_score)

    def _keep_examples(self, batch: dict, maps: Tensor, scores: Tensor) -> None:
        for i in range(len(scores)):
            if self._seen + i in self._example_ids:
                self.examples.append(
                    {
                        "image": batch["image"][i].cpu(),
                        "mask": batch["mask"][i].cpu(),
                        "anomaly_map": maps[i].float().cpu(),
                        "score": float(scores[i]),
                        "label": int(batch["label"][i]),
                        "path": batch["path"][i],
                    }
                )
        self._seen += len(scores)

    def on_test_epoch_end(self) -> None:
        threshold = self.calibration.threshold if self.calibration else None
        self.test_metrics = self.evaluator.compute(threshold) if self._image_metrics else {}
        self.evaluator = None
        if self.test_metrics:
            self.log_dict({f"test/{k}": v for k, v in self.test_metrics.items()})


class FitOnceModule(AnomalyModule):
    """Feeds every training batch to ``model.collect`` for one epoch, then calls ``model.fit``.

    The normal validation split (if any) is scored afterwards to calibrate the threshold.
    """

    def __init__(self, model: FitOnceModel, num_examples: int = 8, threshold_quantile: float = 0.99) -> None:
        super().__init__(model, num_examples, threshold_quantile)
        self.automatic_optimization = False

    def on_train_epoch_start(self) -> None:
        if self.model.is_fitted:
            raise RuntimeError("This method fits in one epoch: set trainer.max_epochs=1.")

    def training_step(self, batch: dict, batch_idx: int) -> None:
        with torch.no_grad():
            self.model.collect(batch["image"])
        if batch_idx == self.trainer.num_training_batches - 1:
            self.model.fit()  # here, not in on_train_epoch_end: Lightning validates before that hook

    def configure_optimizers(self) -> None:
        return None


class TrainedModule(AnomalyModule):
    """Optimises ``model.training_loss(images)`` (a dict with the total under ``"loss"``).

    Manual optimisation, so methods with several optimisers (SimpleNet: adaptor and discriminator)
    need no special casing: every optimiser and scheduler returned by ``configure_optimizers`` — which
    each method's own module defines from plain config values — is stepped once per batch.
    """

    def __init__(self, model: nn.Module, num_examples: int = 8, threshold_quantile: float = 0.99) -> None:
        super().__init__(model, num_examples, threshold_quantile)
        self.automatic_optimization = False

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
