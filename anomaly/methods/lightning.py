"""Thin Lightning glue for the two contracts of :mod:`anomaly.methods.base`.

The pure torch model does the work; these modules only feed it batches. :class:`FitOnceModule` serves
every fit-once method and :class:`TrainedModule` every trained one (a method's own module only names its
optimisers). Scoring a fitted model is one module for every method, :class:`ScoringModule`: its
``predict_step`` gives the calibration scores, its test loop the metrics (returned as a :class:`TestResult`).

On several processes the glue hands every collective step the run's :class:`~anomaly.distributed.Collective`
(:func:`collective_of`), and after fitting and training it checks that every rank holds the same model
(:func:`check_same_state`): rank 0 saves it, and every rank calibrates and tests its own copy.
"""

from typing import NamedTuple

import pytorch_lightning as pl
import torch
from torch import Tensor

from anomaly.distributed import LOCAL, Collective, ProcessGroupCollective
from anomaly.errors import DistributedStateError
from anomaly.methods.base import (
    AnomalyModel,
    FitOnceModel,
    TrainedModel,
    images_on,
    non_finite_error,
    non_finite_paths,
)
from anomaly.metrics import CategoryEvaluators, mean_over_categories


class DDPStrategy(pl.strategies.DDPStrategy):
    """Lightning's DDP, except that a module with no trainable parameter is not wrapped.

    Fit-once methods (PaDiM, PatchCore) take no gradient: they need the processes, the process group and
    the data shards, not gradient synchronisation, and torch's ``DistributedDataParallel`` refuses a
    module without trainable parameters. Trained methods are wrapped as usual.
    """

    def configure_ddp(self) -> None:
        if any(parameter.requires_grad for parameter in self.model.parameters()):
            super().configure_ddp()


def collective_of(trainer: pl.Trainer) -> Collective:
    """The collective of ``trainer``'s processes: :data:`~anomaly.distributed.LOCAL` for one, else the one
    over the process group that the strategy initialised (which must exist: call during fit/test/predict)."""
    return LOCAL if trainer.world_size == 1 else ProcessGroupCollective()


def state_checksums(model: torch.nn.Module) -> tuple[list[str], Tensor]:
    """The names of ``model``'s state tensors (parameters and buffers) and a float64 checksum ``[T, 2]`` of
    each: its sum and its position-weighted sum (a permutation changes the second), NaN counted as 0 and
    infinity as a large finite number so that equal tensors always give equal checksums."""
    names, sums = [], []
    for name, tensor in model.state_dict(keep_vars=True).items():
        values = torch.nan_to_num(tensor.detach().double().flatten(), nan=0.0, posinf=1e300, neginf=-1e300)
        weights = torch.arange(1, len(values) + 1, dtype=torch.float64, device=values.device).sqrt_()
        names.append(name)
        sums.append(torch.stack([values.sum(), (values * weights).sum()]).cpu())
    return names, torch.stack(sums) if sums else torch.zeros(0, 2, dtype=torch.float64)


def check_same_state(model: torch.nn.Module, collective: Collective, after: str) -> None:
    """Raises :class:`~anomaly.errors.DistributedStateError`, naming the tensors, on every rank when some
    rank's parameters or buffers differ from rank 0's (by :func:`state_checksums`). ``after``: the step
    that should have made them agree (for the message)."""
    if collective.size == 1:
        return
    names, local = state_checksums(model)
    ranks = collective.gather_rows(local[None])  # [R, T, 2]
    differ = [name for name, same in zip(names, (ranks == ranks[0]).all(dim=(0, 2)).tolist(), strict=True)
              if not same]  # fmt: skip
    if differ:
        raise DistributedStateError(
            f"After {after}, the {collective.size} processes hold different models: "
            f"{', '.join(differ[:10])}{' ...' if len(differ) > 10 else ''} differ from rank 0's. "
            f"{type(model).__name__} must combine what every process saw through the collective its steps "
            "get (README, Extending); until it does, run it in one process (without trainer=ddp)."
        )


def take_rank_zero_buffers(model: torch.nn.Module, collective: Collective) -> None:
    """Every floating-point buffer set to rank 0's, as DDP does before every step (``broadcast_buffers``):
    once more after the last step, whose updates (BatchNorm's running statistics) are each rank's own."""
    for buffer in model.buffers():
        if buffer.is_floating_point():
            mine = buffer if collective.rank == 0 else torch.zeros_like(buffer)
            buffer.copy_(collective.sum(mine.clone()))  # rank 0's values plus zeros: exactly them


class AnomalyModule(pl.LightningModule):
    """What a method's Lightning module holds: the pure torch model that it fits."""

    def __init__(self, model: AnomalyModel) -> None:
        super().__init__()
        self.model = model

    @property
    def collective(self) -> Collective:
        """The collective of the trainer's processes (:func:`collective_of`)."""
        return collective_of(self.trainer)


class TestResult(NamedTuple):
    """What testing returns: the metrics over every rank's images (of several categories: their mean), each
    category's, and the heatmap examples."""

    metrics: dict[str, float]
    examples: list[dict]  # image, mask, anomaly_map, score, label, path of the kept test images
    per_category: dict[str, dict[str, float]]  # category -> its metrics


class ScoringModule(pl.LightningModule):
    """Scores a fitted model's images: ``predict_step`` for calibration, the test loop for the metrics.

    Built per use with everything it needs: the ``evaluator`` (an evaluation per category that the batches
    name; the metrics are their mean when there are several: the unified protocol), the calibrated
    ``thresholds`` (image, pixel; None: no decision metrics) and ``example_ids`` (test-set positions whose
    maps are kept for heatmaps); :attr:`result` holds what a test returned, once it ended.
    """

    def __init__(
        self,
        model: AnomalyModel,
        evaluator: CategoryEvaluators | None = None,
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
        self._examples, self._non_finite = [], []

    def test_step(self, batch: dict, batch_idx: int) -> None:
        output = self.model(batch["image"])
        if bad := non_finite_paths(output, batch["path"]):  # raised at the end, on every rank at once
            self._non_finite += bad
            return
        self.evaluator.update(batch["category"], output.image_score, batch["label"], output.anomaly_map,
                              batch["mask"], batch["index"])  # fmt: skip
        for i, index in enumerate(batch["index"].tolist()):  # positions in the test set
            if index in self.example_ids:
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

    def on_test_epoch_end(self) -> None:
        collective = collective_of(self.trainer)
        if non_finite := collective.gather_objects(self._non_finite):
            raise non_finite_error(non_finite)
        per_category = self.evaluator.compute(*self.thresholds, collective=collective)  # over all ranks
        (only, *more) = per_category.values()
        metrics = mean_over_categories(per_category) if more else only
        self.result = TestResult(metrics, collective.gather_objects(self._examples), per_category)
        # identical on every rank (computed over all of them): syncing averages equal values
        logged = {f"test/{k}": v for k, v in metrics.items()}
        if more:
            logged |= {f"test/{c}/{k}": v for c, values in per_category.items() for k, v in values.items()}
        self.log_dict(logged, sync_dist=True)


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
        self.model.fit(self.collective)
        check_same_state(self.model, self.collective, "fitting")

    def configure_optimizers(self) -> list:
        return []  # nothing is optimised


class TrainedModule(AnomalyModule):
    """Optimises ``model.training_loss(images)`` (a dict with the total under ``"loss"``).

    ``model.prepare`` gets the training images before the first step and ``model.finalize`` the normal
    images set aside for its normalisation (the data module's ``normalization_dataloader``) after the last,
    both with the run's collective; every rank's model is checked to be the same after each.
    Manual optimisation, so methods with several optimisers (SimpleNet: adaptor and discriminator) need
    no special casing: every optimiser and scheduler that ``configure_optimizers`` returns is stepped once
    per batch.
    """

    def __init__(self, model: TrainedModel) -> None:
        super().__init__(model)
        self.automatic_optimization = False

    def on_train_start(self) -> None:
        with torch.no_grad(), self.trainer.precision_plugin.forward_context():
            batches = images_on(self.trainer.datamodule.train_dataloader(), self.device)
            self.model.prepare(batches, self.collective)
        check_same_state(self.model, self.collective, "prepare()")

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
            take_rank_zero_buffers(self.model, self.collective)
            batches = images_on(self.trainer.datamodule.normalization_dataloader(), self.device)
            self.model.finalize(batches, self.collective)
        self.model.train(was_training)
        check_same_state(self.model, self.collective, "training and finalize()")
