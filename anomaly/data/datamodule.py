"""The Lightning data module shared by every data source: checks, splits, preprocessing and loaders.

A source (MVTec AD, the user's folder, generated data) only says which files are train and test
samples, and which files it saw and did not use. Everything else is here, once: every file checked
before any work, the counts logged, the *calibration images* (normal images the model does not fit on:
``calibration_dir``, the data set's own held-out split, or a seeded share of the training images), the
:class:`Preprocessing` that the model file records, batching.
"""

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from anomaly import distributed
from anomaly.allocator import release_freed_memory
from anomaly.backbones.feature_cache import FeatureStore
from anomaly.data.check import Problem, check_samples, problem_report
from anomaly.data.dataset import ImageDataset
from anomaly.data.decoded_cache import DECODED, DecodedSamples
from anomaly.data.few_shot import ShotViews, all_square, check_shot_settings, draw_shots, shot_views
from anomaly.data.preprocessing import Preprocessing
from anomaly.data.samples import (
    Sample,
    SkippedFile,
    describe_skipped,
    list_images_recursive,
    no_images_error,
    seeded_order,
    seeded_split,
)
from anomaly.errors import ConfigError, DataError

log = logging.getLogger(__name__)
BAD_FILE_POLICIES = ("error", "skip")
ALL_CATEGORIES = "all"  # dataset.category=all: every category the data set knows, one model for all


class Splits(NamedTuple):
    """What a data source lists: normal training images, the test set, and the normal images it holds out
    itself for calibration (MVTec AD 2's and LOCO's ``validation/good``; empty for most)."""

    train: list[Sample]
    test: list[Sample]
    calibration: Sequence[Sample] = ()


class TrimmedForkDataLoader(DataLoader):
    """A DataLoader that returns the heap's free pages to the OS before it forks its workers.

    Workers forked on top of freed-but-kept memory (see anomaly/allocator.py) would share it
    copy-on-write, and the main process would copy each page it reuses while they run.
    """

    def __iter__(self):
        if self.num_workers > 0:
            release_freed_memory()
        return super().__iter__()


class ShardSampler(Sampler[int]):
    """This process's share of a data set's indices (all of them with one process).

    In order (scoring, and fitting fit-once methods): a contiguous block, so that over all ranks every
    image comes exactly once, and the blocks concatenated in rank order are the data set's order (blocks
    differ in size by at most one). Shuffled (training by gradient steps on several processes): a seeded
    permutation per epoch and an equal share of it per rank, the last ``n % ranks`` dropped (as
    ``DistributedSampler(drop_last=True)``), so that every rank takes the same number of steps.
    """

    def __init__(self, size: int, shuffle: bool, seed: int) -> None:
        self.size, self.shuffle, self.seed, self.epoch = size, shuffle, seed, 0
        collective = distributed.process_collective()
        self.rank, self.ranks = collective.rank, collective.size

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before every epoch: a new permutation each epoch."""
        self.epoch = epoch

    def indices(self) -> list[int]:
        if not self.shuffle:
            return list(block_range(self.size, self.ranks, self.rank))
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        share = self.size // self.ranks
        return order[self.rank * share : (self.rank + 1) * share].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        return len(self.indices())


def block_range(total: int, ranks: int, index: int) -> range:
    """Rank ``index``'s contiguous block of ``range(total)``: the first ``total % ranks`` blocks one longer,
    as ``torch.chunk``-like splits do; concatenated in rank order they are ``range(total)``. The one place
    that decides the blocks: everything downstream finds a sample by the ``"index"`` its batch carries."""
    base, extra = divmod(total, ranks)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


class AnomalyDataModule(pl.LightningDataModule):
    """Base data module; subclasses implement :meth:`load_samples` and :attr:`name`.

    The calibration images (:attr:`calibration_samples`, :attr:`calibration_origin` says where from) are
    ``calibration_dir``'s, else the data set's own held-out normal images, else ``calibration_fraction`` of
    the training images; the test set is never used to fit anything. ``normalization_share``: that share of
    the calibration images is set aside for a method's own normalisation (:attr:`normalization_samples`,
    EfficientAD's map quantiles), so that the threshold is calibrated on images independent of it.
    ``on_bad_file``: ``"error"`` stops before any work when a file fails the data check (all problems
    listed); ``"skip"`` leaves those samples out and lists them (:attr:`bad_files`, and the run's
    run.json). ``train_in_order``: training images in data-set order instead of shuffled (fit-once
    methods, whose fit must not depend on how many processes share it).

    Few-shot runs (``shots=k``): the model fits on k normal training images, drawn by ``shot_draw`` alone
    (:func:`~anomaly.data.few_shot.draw_shots`; the test set is unchanged), each in the views of
    :func:`~anomaly.data.few_shot.shot_views` with ``shot_augment``. The calibration images are then
    ``calibration_dir``'s, the data set's own held-out ones, or ``shot_calibration`` un-drawn training
    images when asked for; never ``calibration_fraction`` of the k images or of the un-drawn ones (a
    k-shot user has no others).

    On several processes (``trainer=ddp``) every loader holds this rank's share (:class:`ShardSampler`);
    the sample lists stay whole on every rank.
    """

    submission_format: str | None = None  # how unlabeled_sets' maps are written (reports.submissions)

    def __init__(
        self,
        image_size: int | list[int] = 256,
        crop_size: int | list[int] | None = 224,
        batch_size: int = 32,
        num_workers: int = 2,
        calibration_fraction: float = 0.0,
        seed: int = 0,
        on_bad_file: str = "error",
        calibration_dir: str | None = None,
        train_in_order: bool = False,
        normalization_share: float = 0.0,
        shots: int | None = None,
        shot_draw: int = 0,
        shot_augment: bool = False,
        shot_calibration: int = 0,
    ) -> None:
        super().__init__()
        check_shot_settings(shots, shot_draw, shot_calibration)
        if not 0.0 <= calibration_fraction < 1.0:
            raise ConfigError(f"dataset.calibration_fraction must be in [0, 1), got {calibration_fraction}")
        if not 0.0 <= normalization_share < 1.0:
            raise ConfigError(f"normalization_share must be in [0, 1), got {normalization_share}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"dataset.batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"dataset.num_workers must be an int >= 0, got {num_workers!r}")
        if on_bad_file not in BAD_FILE_POLICIES:
            raise ConfigError(f"dataset.on_bad_file must be one of {BAD_FILE_POLICIES}, got {on_bad_file!r}")
        self.preprocessing = Preprocessing(image_size, crop_size)
        self.transform = self.preprocessing.transform()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.calibration_fraction = calibration_fraction
        self.seed = seed
        self.on_bad_file = on_bad_file
        self.calibration_dir = Path(calibration_dir).expanduser() if calibration_dir else None
        self.train_in_order = train_in_order
        self.normalization_share = normalization_share
        self.shots, self.shot_draw, self.shot_calibration = shots, shot_draw, shot_calibration
        self.shot_augment = bool(shot_augment)
        self.train_samples: list[Sample] = []  # the images the model fits on (the k drawn ones with shots)
        self.calibration_samples: list[Sample] = []  # normal images that calibrate the threshold
        self.normalization_samples: list[Sample] = []  # normal images a method normalises on (disjoint)
        self.calibration_origin: str | None = None  # where the calibration images come from, in words
        self.test_samples: list[Sample] = []
        self.unlabeled: dict[str, list[Sample]] = {}  # test sets without ground truth (unlabeled_sets)
        self.skipped: list[SkippedFile] = []  # seen and not used: other extensions, hidden files, ...
        self.bad_files: list[Problem] = []  # failed the data check and left out (on_bad_file=skip)
        self.categories: tuple[str, ...] | None = None  # a unified run's (one model for several); else None
        self.decoded: DecodedSamples | None = None  # decoded images and passed checks by content (use_cache)

    @property
    def name(self) -> str:
        """A short name for logs and result tables (e.g. the category)."""
        raise NotImplementedError

    def use_cache(self, store: FeatureStore | None) -> None:
        """Decodes and checks each file content once across runs, in ``store`` (the run's feature cache
        folder; None: every run decodes and checks every file): :mod:`anomaly.data.decoded_cache`."""
        self.decoded = None if store is None else DecodedSamples(store.within(DECODED), self.preprocessing)

    def load_samples(self) -> Splits:
        """The data set's samples; appends the files it saw and does not use to ``self.skipped``."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Lists the files, draws a few-shot run's images, checks every file it uses (once), then splits;
        raises DataError naming every bad file."""
        if self.train_samples:
            return
        train, test, own_calibration = self.load_samples()
        calibration = self._calibration_dir_samples() or list(own_calibration)
        shot_calibration: list[Sample] = []
        if self.shots is not None:  # drawn before the check: un-drawn images are never read
            train, shot_calibration = self._draw_shots(train, bool(calibration))
        unlabeled = self.unlabeled_sets()
        calibration = calibration or shot_calibration
        every = [*train, *test, *calibration, *(s for samples in unlabeled.values() for s in samples)]
        problems = check_samples(every, description=f"Checking {self.name}", decoded=self.decoded)
        if problems and self.on_bad_file == "error":
            raise DataError(
                problem_report(problems, self.name, len(train) + len(test))
                + "\nFix these files, or pass dataset.on_bad_file=skip to leave them out (they are then "
                "listed in the run's run.json)."
            )
        if problems:
            log.warning("%s\nLeaving these samples out (dataset.on_bad_file=skip).",
                        problem_report(problems, self.name, len(train) + len(test)))  # fmt: skip
            bad = {problem.sample for problem in problems}
            train = [sample for sample in train if sample not in bad]
            test = [sample for sample in test if sample not in bad]
            calibration = [sample for sample in calibration if sample not in bad]
            unlabeled = {name: [s for s in samples if s not in bad] for name, samples in unlabeled.items()}
            self.bad_files = problems
        if not train:
            raise DataError(f"No usable training images in {self.name}.")
        if self.shots is not None and len(train) < self.shots:
            raise DataError(
                f"dataset.shots={self.shots}: {self.shots - len(train)} of the drawn images failed the data "
                "check (listed above). Fix them, or take another draw (dataset.shot_draw)."
            )
        self.test_samples, self.unlabeled = test, unlabeled
        if self.calibration_dir is not None:  # normal images beside the training ones: all of these train
            self.calibration_origin = f"dataset.calibration_dir ({self.calibration_dir})"
        elif calibration and shot_calibration:
            self.calibration_origin = (
                f"{len(calibration)} un-drawn training images (dataset.shot_calibration)"
            )
        elif calibration:
            self.calibration_origin = f"the data set's own held-out normal images ({self.name})"
        elif self.shots is not None:  # no calibration images: the threshold source says what that means
            if self.calibration_fraction:
                log.info("dataset.calibration_fraction=%g does not apply to a few-shot run: it would hold "
                         "out some of the k images, or use un-drawn ones a k-shot user does not have "
                         "(dataset.shot_calibration=<n> asks for those).",
                         self.calibration_fraction)  # fmt: skip
        else:
            train, calibration = seeded_split(train, round(len(train) * self.calibration_fraction), self.seed)
            if calibration:
                share = self.calibration_fraction
                self.calibration_origin = f"a seeded {share:g} share of the training images"
        self.train_samples = train
        self.calibration_samples, self.normalization_samples = calibration, []
        if self.normalization_share and calibration:
            count = max(1, round(len(calibration) * self.normalization_share))
            self.calibration_samples, self.normalization_samples = seeded_split(calibration, count, self.seed)
        log.info(self.summary())

    def _draw_shots(self, train: list[Sample], has_calibration: bool) -> tuple[list[Sample], list[Sample]]:
        """The k drawn training images and the ``shot_calibration`` un-drawn ones; the draw logged."""
        if self.shot_calibration and has_calibration:
            where = (
                "dataset.calibration_dir" if self.calibration_dir else "the data set's own held-out images"
            )
            raise ConfigError(
                f"dataset.shot_calibration={self.shot_calibration}, but {where} calibrate this run: set "
                "dataset.shot_calibration=0 (or, for generated data, dataset.n_calibration=0)."
            )
        drawn, calibration = draw_shots(train, self.shots, self.shot_draw, self.shot_calibration, self.name)
        log.info("Few-shot: %d of %d normal training images (dataset.shot_draw=%d): %s", self.shots,
                 len(train), self.shot_draw, ", ".join(str(s.image_path) for s in drawn))  # fmt: skip
        return drawn, calibration

    def unlabeled_sets(self) -> dict[str, list[Sample]]:
        """Test images without ground truth that a benchmark scores elsewhere (MVTec AD 2's private sets):
        checked with the rest; ``anomaly-train`` scores them after testing and writes the maps in
        :attr:`submission_format` (:mod:`anomaly.reports.submissions`)."""
        return {}

    def _calibration_dir_samples(self) -> list[Sample]:
        """The normal images of ``calibration_dir`` (anywhere below it), none without one."""
        if self.calibration_dir is None:
            return []
        skipped: list[SkippedFile] = []
        paths = list_images_recursive(self.calibration_dir, skipped=skipped)
        self.skipped += skipped
        if not paths:
            raise no_images_error(self.calibration_dir, skipped, "Check dataset.calibration_dir.")
        return [Sample(path, 0, None, "good") for path in paths]

    def summary(self) -> str:
        """Counts per split and what was not used, for the log."""
        test = Counter(sample.label for sample in self.test_samples)
        masks = sum(sample.mask_path is not None for sample in self.test_samples)
        calibration = f"{len(self.calibration_samples)}{' (calibration_dir)' if self.calibration_dir else ''}"
        if self.normalization_samples:
            calibration += f" (+{len(self.normalization_samples)} for the method's normalisation)"
        lines = [
            f"Data {self.name}: train {len(self.train_samples)} images{self._shots_note()}, calibration "
            f"{calibration}, "
            f"test {len(self.test_samples)} ({test[0]} good, {test[1]} defective, {masks} masks)"
            + "".join(
                f", {name} {len(samples)} (no ground truth)" for name, samples in self.unlabeled.items()
            )
        ]
        if self.skipped:
            lines.append(f"  {describe_skipped(self.skipped)}")
        return "\n".join(lines)

    def _shots_note(self) -> str:
        if self.shots is None:
            return ""
        views = f", each in {len(self._shot_views())} views" if self.shot_augment else ""
        return f" (few-shot: dataset.shots={self.shots}, draw {self.shot_draw}{views})"

    def _shot_views(self) -> list[Callable[[Tensor], Tensor]]:
        """The views of each drawn image with ``shot_augment``: all 8 only when every image is square (by
        the preprocessing's output size, else by the drawn images' own sizes)."""
        size = self.preprocessing.output_size
        square = (
            size[0] == size[1] if size is not None else all_square(s.image_path for s in self.train_samples)
        )
        return shot_views(square)

    def training_image_count(self) -> int:
        """How many images the model fits on: the training images, each in its views with shot_augment."""
        return len(self.train_samples) * (len(self._shot_views()) if self.shot_augment else 1)

    def has_pixel_ground_truth(self) -> bool:
        """Pixel metrics need a mask for every defective test image."""
        defective = [s for s in self.test_samples if s.label == 1]
        return bool(defective) and all(s.mask_path is not None for s in defective)

    def _loader(self, samples: list[Sample], shuffle: bool, augment: bool = False) -> DataLoader:
        """Batches of ``samples`` (each in the few-shot views with ``augment``): shuffled by the seeded
        generator on one process, else this rank's share."""
        generator = torch.Generator().manual_seed(self.seed)
        dataset = ImageDataset(samples, self.transform, decoded=self.decoded)
        if augment:
            dataset = ShotViews(dataset, self._shot_views())
        sampler = None
        if distributed.process_collective().size > 1 or not shuffle:
            sampler, shuffle = ShardSampler(len(dataset), shuffle, self.seed), False
        return TrimmedForkDataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_samples, shuffle=not self.train_in_order, augment=self.shot_augment)

    def fold_dataloaders(self, folds: int) -> list[DataLoader]:
        """The training images in ``folds`` seeded, disjoint folds of (almost) equal size, a loader each."""
        if not 2 <= folds <= len(self.train_samples):
            raise ConfigError(f"threshold.folds must be in [2, {len(self.train_samples)}], got {folds}")
        order = torch.tensor(seeded_order(len(self.train_samples), self.seed))
        return [
            self._loader([self.train_samples[i] for i in part.tolist()], False) for part in order.chunk(folds)
        ]

    def calibration_dataloader(self) -> DataLoader:
        """The calibration images: the decision thresholds. Not named ``val_dataloader``: Lightning never
        validates during fitting here."""
        return self._loader(self.calibration_samples, shuffle=False)

    def normalization_dataloader(self) -> DataLoader:
        """The normal images a method normalises its maps on (``normalization_share``; EfficientAD)."""
        return self._loader(self.normalization_samples, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_samples, shuffle=False)

    def unlabeled_dataloader(self, name: str) -> DataLoader:
        return self._loader(self.unlabeled[name], shuffle=False)


class CategoryDataModule(AnomalyDataModule):
    """One category of a benchmark (``category="bottle"``), or several fitted as one model: the unified
    protocol (UniAD, ADer, Dinomaly), ``category=[bottle, cable]`` or ``category=all`` (every one of
    :attr:`known_categories`). ``root`` holds the data set.

    A source lists one category in :meth:`load_category`; a unified run lists each of its categories
    there and tags every sample with its category (``Sample.category``), so that testing evaluates each
    category on its own while the model fits on the union of their training images and one calibration
    covers the union of their calibration images. Images of every category are preprocessed alike, to one
    size (:func:`check_one_size`), so that batches mixing categories stack.
    """

    known_categories: tuple[str, ...] = ()  # what category=all names: the data set's published categories

    def __init__(self, root: str, category: str | Sequence[str], **loader_options) -> None:
        super().__init__(**loader_options)
        self.root = Path(root).expanduser()
        self.categories = unified_categories(category, self.known_categories)  # None: one category
        self.category = category_name(category)
        if self.categories is not None:
            check_one_size(self.preprocessing)
            if self.shots is not None:
                raise ConfigError(
                    f"dataset.shots={self.shots} with several categories ({self.category}): few-shot runs "
                    "fit one category each. Sweep the categories instead (dataset.category=a,b -m) or "
                    "drop dataset.shots for one model on all their images."
                )

    @property
    def name(self) -> str:
        return self.category

    def load_category(self, category: str) -> Splits:
        """One category's samples; appends the files it saw and does not use to ``self.skipped``."""
        raise NotImplementedError

    def available_categories(self) -> list[str]:
        """The categories this source can list under ``root`` (checked before a unified run lists any)."""
        raise NotImplementedError

    def load_samples(self) -> Splits:
        if self.categories is None:
            return tagged(self.load_category(self.category), self.category)
        available = self.available_categories()
        if missing := [category for category in self.categories if category not in available]:
            raise DataError(
                f"dataset.category names {', '.join(repr(c) for c in missing)}, which {self.root} does not "
                f"hold; it holds: {', '.join(available) or 'nothing'}. Fix the list (dataset.category=["
                f"{','.join(c for c in self.categories if c in available) or '<category>,...'}]) or pass "
                "dataset.category=all for all of the data set's categories."
            )
        parts = [tagged(self.load_category(category), category) for category in self.categories]
        return Splits(*([sample for part in parts for sample in part[i]] for i in range(3)))

    def summary(self) -> str:
        """The counts of :meth:`AnomalyDataModule.summary`, and per category in a unified run."""
        if self.categories is None:
            return super().summary()
        counts = {category: [0, 0] for category in self.categories}
        for samples, column in ((self.train_samples, 0), (self.test_samples, 1)):
            for sample in samples:
                counts[sample.category][column] += 1
        per_category = ", ".join(f"{c} {train}/{test}" for c, (train, test) in counts.items())
        return f"{super().summary()}\n  per category (train/test images): {per_category}"


def unified_categories(category: object, known: Sequence[str]) -> tuple[str, ...] | None:
    """The categories of a unified run (``dataset.category`` a list, or ``all``: ``known``); None for one
    category (a plain name). An empty list, a repeated name or a name that is not text is a ConfigError."""
    if isinstance(category, str):
        if category != ALL_CATEGORIES:
            return None
        if not known:
            raise ConfigError(
                "dataset.category=all needs a data set that knows its categories; this one does not: "
                "name them, dataset.category=[<category>,<category>,...]"
            )
        return tuple(known)
    if not isinstance(category, Sequence) or not all(isinstance(c, str) and c for c in category):
        raise ConfigError(
            f"dataset.category must be a category name, a list of names or all, got {category!r}"
        )
    hint = f" (this data set's: {', '.join(known)})" if known else ""
    if not category:
        raise ConfigError(
            "dataset.category=[] names no category: name one (dataset.category=<category>), several "
            f"(dataset.category=[<category>,<category>]) or all{hint}"
        )
    if repeated := sorted({c for c in category if list(category).count(c) > 1}):
        raise ConfigError(f"dataset.category names {', '.join(repeated)} more than once: name each once")
    return tuple(category)


def category_name(category: str | Sequence[str]) -> str:
    """What a run's categories are called in folder names, logs and records: the category, ``all``, or
    the listed names joined by ``+`` (``fabric+tile+washer``)."""
    return category if isinstance(category, str) else "+".join(category)


def check_one_size(preprocessing: Preprocessing) -> None:
    """A unified run needs one image size for every category, so that batches mixing them stack: an int
    ``image_size`` keeps each image's aspect ratio, and is refused without a crop."""
    if preprocessing.output_size is None:
        raise ConfigError(
            "A run over several categories needs one image size for all of them, so that their images batch "
            f"together; dataset.image_size={preprocessing.image_size} with dataset.crop_size=null keeps each "
            "image's aspect ratio. Pass dataset.image_size=[<height>,<width>] (every image resized to "
            "it exactly) or dataset.crop_size=<side> (the shorter side resized to image_size, then a "
            "centred square crop)."
        )


def tagged(splits: Splits, category: str) -> Splits:
    """``splits`` with every sample tagged with ``category``."""
    return Splits(*([replace(sample, category=category) for sample in part] for part in splits))
