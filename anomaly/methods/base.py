"""The contracts every method implements.

A method is a pure torch ``nn.Module`` (no Lightning, Hydra or file I/O) whose ``forward(images)`` maps
a batch of images ``[B, 3, H, W]`` in [0, 1] to an :class:`AnomalyOutput`, deterministically in eval
mode. How it learns is one of two contracts:

* :class:`FitOnceModel` (PaDiM, PatchCore): ``collect(images)`` for every training batch, then
  ``fit()`` once; no gradient is ever taken.
* :class:`TrainedModel` (SimpleNet, EfficientAD): ``training_loss(images)`` is minimised by the
  optimisers its Lightning module names; ``prepare(batches)`` runs before the first step (on training
  images) and ``finalize(batches)`` after the last (on calibration images set aside for it), both optional.

On several processes (``trainer=ddp``) each rank sees its block of the images; the steps that turn them
into the fitted state (``fit``, ``prepare``, ``finalize``, ``cross_fit_scores``) get a
:class:`~anomaly.distributed.Collective` (default: one process) and combine through it what every rank
saw (sums, maxima, gathered rows), so that every rank ends with the model one process fits on all images.
The glue checks that they do (:func:`anomaly.methods.lightning.check_same_state`). A method reads no
process state itself.

Fitted state lives in buffers, so ``state_dict()`` is the whole model file. Buffers whose shape is only
known after fitting are registered empty with :func:`register_fitted_buffer`; loading a state dict then
resizes them instead of failing on the shape mismatch. The Lightning glue for both contracts is in
:mod:`anomaly.methods.lightning`.
"""

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from anomaly.backbones.feature_cache import FeatureCache, use_cache
from anomaly.distributed import LOCAL, Collective
from anomaly.errors import DataError


class AnomalyOutput(NamedTuple):
    """What every method returns in eval mode (a NamedTuple so that export sees plain tensors)."""

    anomaly_map: Tensor  # [B, 1, H, W] at the input image size, higher = more anomalous
    image_score: Tensor  # [B]


@dataclass(frozen=True)
class RunResources:
    """What the machine that fits or updates a model lends it: where it has room, never part of the model or
    its file. ``anomaly-train`` and ``anomaly-update`` hand their models one
    (:meth:`AnomalyModel.use_resources`); a model given none uses none (``anomaly-predict``, export).
    """

    spill_dir: str | None = None  # PatchCore's collected patches wait here for the coreset; None: $TMPDIR
    feature_cache: FeatureCache | None = None  # frozen networks' outputs across runs and epochs; None: off


class AnomalyModel(nn.Module):
    """What both contracts share: scoring, the fitted state, export, and the run's resources."""

    def use_resources(self, resources: RunResources) -> None:
        """Takes this run's machine resources: every frozen network of the model (backbone, EfficientAD's
        teacher) reads and writes the feature cache. A method that uses more of them extends this
        (PatchCore: the spill folder); a model of models hands them on."""
        use_cache(self, resources.feature_cache)

    @property
    def is_fitted(self) -> bool:
        """Whether ``forward`` can score (all fitted buffers set)."""
        raise NotImplementedError

    def forward(self, images: Tensor) -> AnomalyOutput:
        raise NotImplementedError

    def minimum_training_images(self) -> tuple[int, str]:
        """The fewest normal training images this model fits on, and why (in words): checked before any
        work, so that a run on fewer (a few-shot run's k) is refused at once."""
        return 1, "every method here fits on a single normal image"

    def use_graph_safe_ops(self) -> None:
        """Switches to operations that tracing and ``torch.export`` capture, with the same values (e.g.
        PatchCore's pure-torch k-NN instead of faiss). Called by ``anomaly-export`` on its own copy."""


class FitOnceModel(AnomalyModel):
    """Fitted in one pass over normal images, without an optimiser."""

    def collect(self, images: Tensor) -> None:
        """Extracts what ``fit`` needs from one training batch ``[B, 3, H, W]``."""
        raise NotImplementedError

    def fit(self, collective: Collective = LOCAL) -> None:
        """Turns everything collected into the fitted state (buffers); frees the collection. On several
        processes each collected its block of the images, and the state must be that of all of them,
        combined through ``collective``, the same on every rank."""
        raise NotImplementedError

    @torch.no_grad()
    def cross_fit_scores(
        self,
        folds: Sequence[Callable[[], Iterable[Tensor]]],
        new_model: Callable[[], "FitOnceModel"],
        collective: Collective = LOCAL,
    ) -> tuple[Tensor, Tensor]:
        """Image scores ``[n]`` and map maxima ``[n]`` of every training image, each from a model fitted
        on the other folds only (held-out scores for calibration; the fitted model is not changed).

        ``folds[f]()`` yields fold f's image batches (this rank's block of them), and the scores are this
        rank's images'. By default one ``new_model()`` is fitted per fold;
        a method that can leave a fold out more cheaply overrides this (PaDiM subtracts statistics).
        """
        scores, maxima = [], []
        for held_out in range(len(folds)):
            model = new_model().eval()
            for other, fold in enumerate(folds):
                for images in fold() if other != held_out else ():
                    model.collect(images)
            model.fit(collective)
            for images in folds[held_out]():
                output = model(images)
                scores.append(output.image_score)
                maxima.append(output.anomaly_map.amax(dim=(1, 2, 3)))
        return torch.cat(scores), torch.cat(maxima)

    def update(self, batches: Iterable[Tensor]) -> None:
        """Learns new normal images without a refit (``anomaly-update``); not every method can."""
        raise NotImplementedError(f"{type(self).__name__} cannot add images to a fitted model: refit it")


class TrainedModel(AnomalyModel):
    """Trained by gradient steps on ``training_loss``."""

    # constructor values needed to train but not to rebuild a trained model from its file (which holds
    # their result, e.g. EfficientAD's teacher weights): a loaded model gets None for them
    training_only_arguments: ClassVar[tuple[str, ...]] = ()
    # the share of the calibration images that ``finalize`` gets, disjoint from those that calibrate the
    # threshold (whose guarantee needs scores independent of the model's own normalisation)
    normalization_share: ClassVar[float] = 0.0

    @property
    def trained_model(self) -> "TrainedModel":
        """The model whose parameters the optimisers step: this one, or the one a tiling shares."""
        return self

    def training_loss(self, images: Tensor) -> dict[str, Tensor]:
        """The losses of a batch of normal images; the total, which is minimised, under ``"loss"``."""
        raise NotImplementedError

    def prepare(self, batches: Iterable[Tensor], collective: Collective = LOCAL) -> None:
        """Before the first step: statistics over the training images (batches ``[B, 3, H, W]``, this
        rank's block; the statistics over every rank's, through ``collective``)."""

    def finalize(self, batches: Iterable[Tensor], collective: Collective = LOCAL) -> None:
        """After the last step: what scoring needs from normal images the model did not train on (the data
        module's ``normalization_samples``, never test images; this rank's block, combined through
        ``collective``)."""


def non_finite_paths(output: AnomalyOutput, paths: Sequence[str]) -> list[str]:
    """The images of a batch (``paths[i]`` is image i of ``output``) with a NaN or infinite score or map."""
    finite = torch.isfinite(output.image_score) & torch.isfinite(output.anomaly_map).flatten(1).all(dim=1)
    return [str(paths[i]) for i in (~finite).nonzero().flatten().tolist()]


def non_finite_error(paths: Sequence[str]) -> DataError:
    """A NaN or infinite score is never a decision: the error that names the images that scored so."""
    return DataError(
        f"The model scored {len(paths)} image(s) as NaN or infinity, which is no decision: "
        f"{', '.join(paths[:5])}{' ...' if len(paths) > 5 else ''}. Check these files (decodable, not "
        "blank) and the model file (re-run anomaly-train if it was edited or damaged)."
    )


def check_finite(output: AnomalyOutput, paths: Sequence[str]) -> None:
    """Raises :func:`non_finite_error` if any image of the batch scored NaN or infinity."""
    if bad := non_finite_paths(output, paths):
        raise non_finite_error(bad)


def images_on(loader: Iterable[dict], device: torch.device | str) -> Iterator[Tensor]:
    """The images ``[B, 3, H, W]`` of ``loader``'s batches, on ``device``: what fitting and updates take."""
    return (batch["image"].to(device) for batch in loader)


def score_batches(
    model: nn.Module, loader: Iterable[dict], device: torch.device | str
) -> Iterator[tuple[dict, AnomalyOutput]]:
    """Each batch of ``loader`` (``"image"`` ``[B, 3, H, W]``, ``"path"`` its B files) with the model's
    output on ``device``, in eval mode and without gradients; an image scored NaN or infinity is a
    DataError naming it (:func:`check_finite`)."""
    model.eval()
    for batch in loader:
        with torch.no_grad():
            output = model(batch["image"].to(device))
        check_finite(output, batch["path"])
        yield batch, output


def register_fitted_buffer(module: nn.Module, name: str) -> None:
    """Registers an empty buffer that fitting fills and ``load_state_dict`` resizes."""
    module.register_buffer(name, torch.empty(0))
    if not getattr(module, "_resizes_fitted_buffers", False):
        module._register_load_state_dict_pre_hook(_resize_fitted_buffers, with_module=True)
        module._resizes_fitted_buffers = True


def _resize_fitted_buffers(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    for name, buffer in module.named_buffers(recurse=False):
        saved = state_dict.get(prefix + name)
        if saved is not None and saved.shape != buffer.shape:
            module._buffers[name] = torch.empty_like(saved, device=buffer.device)
