"""Thin Lightning glue for the two contracts of :mod:`anomaly.methods.base`.

The pure torch model does the work; these modules only feed it batches. :class:`FitOnceModule` serves
every fit-once method and :class:`TrainedModule` every trained one (a method's own module only names its
optimisers). Scoring a fitted model is one module for every method, :class:`ScoringModule`: its
``predict_step`` gives the calibration scores, its test loop the metrics (returned as a :class:`TestResult`).
"""

from typing import NamedTuple

import pytorch_lightning as pl
import torch
from torch import Tensor

from anomaly import distributed
from anomaly.methods.base import (
    AnomalyModel,
    FitOnceModel,
    TrainedModel,
    images_on,
    non_finite_error,
    non_finite_paths,
)
from anomaly.metrics import Evaluator


class DDPStrategy(pl.strategies.DDPStrategy):
    """Lightning's DDP, except that a module with no trainable parameter is not wrapped.

    Fit-once methods (PaDiM, PatchCore) take no gradient: they need the processes, the process group and
    the data shards, not gradient synchronisation, and torch's ``DistributedDataParallel`` refuses a
    module without trainable parameters. Trained methods are wrapped as usual.
    """

    def configure_ddp(self) -> None:
        if any(parameter.requires_grad for parameter in self.model.parameters()):
            super().configure_ddp()


class AnomalyModule(pl.LightningModule):
    """What a method's Lightning module holds: the pure torch model that it fits."""

    def __init__(self, model: AnomalyModel) -> None:
        super().__init__()
        self.model = model


class TestResult(NamedTuple):
    """What testing returns: the metrics over every rank's images, and the heatmap examples."""

    metrics: dict[str, float]
    examples: list[dict]  # image, mask, anomaly_map, score, label, path of the kept test images


class ScoringModule(pl.LightningModule):
    """Scores a fitted model's images: ``predict_step`` for calibration, the test loop for the metrics.

    Built per use with everything it needs: the ``evaluator`` (the metrics' settings), the calibrated
    ``thresholds`` (image, pixel; None: no decision metrics) and ``example_ids`` (test-set positions whose
    maps are kept for heatmaps); :attr:`result` holds what a test returned, once it ended.
    """

    def __init__(
        self,
        model: AnomalyModel,
        evaluator: Evaluator | None = None,
        thresholds: tuple[float | None, float | None] = (None, None),
        example_ids: frozenset[int] = frozenset(),
    ) -> None:
        super().__init__()
        self.model = model
        self.evaluator = evaluator
        self.thresholds = thresholds
        self.example_ids = example_ids
        self.result: TestResult | None = None
        self._examples: list[dict] = []
        self._seen = 0
        self._non_finite: list[str] = []  # test images that scored NaN or infinity

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Image scores ``[B]`` and each map's maximum ``[B]``, on the CPU (what calibration needs), and the
        images that scored NaN or infinity (the caller raises for them once every rank has finished)."""
        output = self.model(batch["image"])
        return {
            "image_score": output.image_score.float().cpu(),
            "map_max": output.anomaly_map.amax(dim=(1, 2, 3)).float().cpu(),
            "non_finite": non_finite_paths(output, batch["path"]),
        }

    def on_test_start(self) -> None:
        if self.evaluator is None:
            raise RuntimeError("ScoringModule needs an evaluator to test")
        self._examples, self._seen, self._non_finite = [], 0, []
        if distributed.is_distributed():  # this rank scores its block of the test set
            total = len(self.trainer.datamodule.test_samples)
            self._seen = distributed.block_range(total, distributed.world_size(), distributed.rank()).start

    def test_step(self, batch: dict, batch_idx: int) -> None:
        output = self.model(batch["image"])
        if bad := non_finite_paths(output, batch["path"]):  # raised at the end, on every rank at once
            self._non_finite += bad
            return
        self.evaluator.update(output.image_score, batch["label"], output.anomaly_map, batch["mask"])
        for i in range(len(output.image_score)):
            if self._seen + i in self.example_ids:
                self._examples.append(
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
        if non_finite := distributed.gather_objects(self._non_finite):
            raise non_finite_error(non_finite)
        metrics = self.evaluator.compute(*self.thresholds)  # over all ranks
        self.result = TestResult(metrics, distributed.gather_objects(self._examples))
        # identical on every rank (computed over all of them): syncing averages equal values
        self.log_dict({f"test/{k}": v for k, v in metrics.items()}, sync_dist=True)


class FitOnceModule(AnomalyModule):
    """Feeds every training batch to ``model.collect`` for one epoch, then calls ``model.fit`` once."""

    def __init__(self, model: FitOnceModel) -> None:
        super().__init__(model)
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

    ``model.prepare`` gets the training images before the first step and ``model.finalize`` the normal
    images set aside for its normalisation (the data module's ``normalization_dataloader``) after the last.
    Manual optimisation, so methods with several optimisers (SimpleNet: adaptor and discriminator) need
    no special casing: every optimiser and scheduler that ``configure_optimizers`` returns is stepped once
    per batch.
    """

    def __init__(self, model: TrainedModel) -> None:
        super().__init__(model)
        self.automatic_optimization = False

    def on_train_start(self) -> None:
        with torch.no_grad(), self.trainer.precision_plugin.forward_context():
            self.model.prepare(images_on(self.trainer.datamodule.train_dataloader(), self.device))

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
            self.model.finalize(images_on(self.trainer.datamodule.normalization_dataloader(), self.device))
        self.model.train(was_training)
