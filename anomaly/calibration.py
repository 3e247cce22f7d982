"""Decision thresholds with a stated false-alarm guarantee, fitted on normal images only.

The user states a budget α (``threshold.false_alarm_rate``) and a confidence 1 − δ. From n image scores
of normal images that the model did not fit on, the threshold is their k-th smallest score X₍ₖ₎, with k
the smallest order for which a new good part exchangeable with them is flagged (score > X₍ₖ₎) with
probability at most α, with confidence 1 − δ over the draw of the n images. For continuous scores
F(X₍ₖ₎) ~ Beta(k, n − k + 1) whatever the score distribution, so

    P(false-alarm rate ≤ α) = P(Binomial(n, 1 − α) ≤ k − 1) ≥ 1 − δ.

This is Wilks' distribution-free one-sided tolerance limit (S. S. Wilks, "Determination of sample sizes
for setting tolerance limits", Ann. Math. Statist. 12, 1941), the training-conditional ("PAC") guarantee
of split conformal prediction (A. N. Angelopoulos and S. Bates, "A gentle introduction to conformal
prediction and distribution-free uncertainty quantification", 2021, Sec. on conformal risk control and
tolerance regions). When no k ≤ n suffices, the largest score is used, and the rate it guarantees,
1 − δ^(1/n), is reported instead. The pixel threshold is the same order statistic over each normal image's
map maximum: with it at most a share α_pix of good parts gets any false-positive pixel.

Which normal images those are is decided here too (:func:`choose_source`): the data module's calibration
images, or for fit-once methods without any a cross-fit over the training images.
"""

import logging
import math
from dataclasses import asdict, dataclass, fields

import torch
from scipy import stats
from torch import Tensor

from anomaly.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Guarantee:
    """The order statistic chosen for one budget, and what it guarantees."""

    threshold: float  # the k-th smallest normal score; above it is anomalous
    order: int  # k (1-based), of num_images
    num_images: int  # n
    guaranteed_rate: float  # the false-alarm rate guaranteed at the confidence (<= the budget if met)
    budget_met: bool


@dataclass(frozen=True)
class Calibration:
    """What ``anomaly-train`` fitted on normal images: thresholds, their guarantees, the scores themselves."""

    threshold: float  # image scores above it are anomalous
    pixel_threshold: float  # map values above it are defect pixels
    normal_median: float  # median normal image score: the normalised score's 0
    false_alarm_rate: float  # the image budget asked (α)
    pixel_false_alarm_rate: float  # the budget for good parts with any false-positive pixel
    confidence: float  # 1 − δ
    guaranteed_rate: float  # the image false-alarm rate guaranteed at that confidence
    pixel_guaranteed_rate: float
    order: int  # the threshold is the order-th smallest of num_images normal scores
    num_images: int
    validation_upper_bound: float  # Clopper–Pearson upper bound of the rate observed on these scores
    source: str  # where the calibration images came from, in words (CalibrationSource.description)
    scores: tuple[float, ...] = ()  # the normal image scores (drift checks and model updates use them)
    map_maxima: tuple[float, ...] = ()  # their maps' maxima (model updates refit the pixel threshold)

    def __post_init__(self) -> None:
        """Every value finite and in range (a NaN threshold would call every part good); a calibration read
        from a model file is checked here too."""
        numbers = [
            getattr(self, f.name) for f in fields(self) if f.name not in ("source", "scores", "map_maxima")
        ]
        if not all(math.isfinite(value) for value in [*numbers, *self.scores, *self.map_maxima]):
            raise ConfigError("calibration values and scores must be finite numbers, got NaN or infinity")
        rates = (self.false_alarm_rate, self.pixel_false_alarm_rate, self.confidence)
        if not all(0 < rate < 1 for rate in rates):
            raise ConfigError(f"calibration budgets and confidence must be in (0, 1), got {rates}")
        if not all(0 <= rate <= 1 for rate in (self.guaranteed_rate, self.pixel_guaranteed_rate,
                                                self.validation_upper_bound)):  # fmt: skip
            raise ConfigError("calibration guaranteed rates must be in [0, 1]")
        counts_are_ints = all(
            isinstance(v, int) and not isinstance(v, bool) for v in (self.order, self.num_images)
        )
        if (
            not counts_are_ints
            or not 1 <= self.order <= self.num_images
            or (self.scores and len(self.scores) != self.num_images)
        ):
            raise ConfigError(
                f"calibration order {self.order} of {self.num_images} images does not fit its "
                f"{len(self.scores)} scores"
            )
        if len(self.map_maxima) != len(self.scores):
            raise ConfigError("calibration needs one map maximum per score")

    def normalise(self, scores: Tensor) -> Tensor:
        """0 = a typical good part, 1 = at the threshold (same formula for image scores and maps)."""
        return (scores - self.normal_median) / max(self.threshold - self.normal_median, 1e-12)

    def describe(self) -> str:
        """The guarantee in words, as the commands print it."""
        unmet = (
            ""
            if self.guaranteed_rate <= self.false_alarm_rate
            else (f" (the budget of {100 * self.false_alarm_rate:g} % needs more normal images)")
        )
        return (
            f"threshold {self.threshold:.6g} from {self.num_images} normal images ({self.source}): at most "
            f"{100 * self.guaranteed_rate:.1f} % false alarms on good parts with "
            f"{100 * self.confidence:.0f} % confidence{unmet}; pixel threshold "
            f"{self.pixel_threshold:.6g}: at most "
            f"{100 * self.pixel_guaranteed_rate:.1f} % of good parts with any false-positive pixel"
        )

    def to_dict(self) -> dict:
        return asdict(self) | {"scores": list(self.scores), "map_maxima": list(self.map_maxima)}

    def summary(self) -> dict[str, float | str]:
        """Everything but the scores, for metrics.json and logs."""
        return {key: value for key, value in asdict(self).items() if key not in ("scores", "map_maxima")}

    @classmethod
    def from_dict(cls, values: object) -> "Calibration | None":
        """The calibration :meth:`to_dict` wrote (None stays None); anything else is a ConfigError."""
        if values is None:
            return None
        names = {field.name for field in fields(cls)}
        if not isinstance(values, dict) or set(values) != names:
            raise ConfigError(f"calibration must have exactly the keys {sorted(names)}, got {values!r}")
        lists = {key: values[key] for key in ("scores", "map_maxima")}
        numbers = [v for k, v in values.items() if k not in ("source", *lists)]
        if not all(isinstance(v, list) for v in lists.values()):
            raise ConfigError("calibration scores must be lists of numbers")
        if not all(_is_number(v) for v in [*numbers, *lists["scores"], *lists["map_maxima"]]):
            raise ConfigError("calibration values must be numbers")
        if not isinstance(values["source"], str):
            raise ConfigError("calibration source must be a string")
        return cls(**{**values, **{key: tuple(float(v) for v in value) for key, value in lists.items()}})


SOURCES = ("auto", "calibration_images", "cross_fit", "none")  # threshold.source


@dataclass(frozen=True)
class CalibrationSource:
    """Which normal images give the calibration scores, and how the run records them."""

    kind: str  # "calibration_images" (the data module's), "cross_fit" (over the training images) or "none"
    description: str  # recorded in the model file and run.json; for "none": why the run has no threshold


def choose_source(
    setting: str,
    calibration_origin: str | None,
    fits_once: bool,
    num_train: int,
    folds: int,
    few_shot: bool = False,
    augmented: bool = False,
) -> CalibrationSource:
    """The source that ``threshold.source`` names (kind ``"none"``: no threshold, and why).
    ``calibration_origin`` is the data module's description of its calibration images (None: it has none);
    ``auto`` takes them, else a ``folds``-fold cross-fit for fit-once methods, else no threshold (said in
    the log). A few-shot run (``few_shot``: its ``num_train`` images are the k drawn ones, ``augmented``
    with their views) cross-fits on ``auto`` only when k >= folds and without views: then each image is
    scored by a model fitted on at least (folds − 1)/folds of the others, as with all training images."""
    if setting not in SOURCES:
        raise ConfigError(f"threshold.source must be one of {', '.join(SOURCES)}, got {setting!r}")
    if setting == "none":
        return CalibrationSource("none", "threshold.source=none")
    if setting == "auto":
        cross_fit_applies = fits_once and (not few_shot or (num_train >= folds and not augmented))
        if not calibration_origin and not cross_fit_applies:
            reason = no_threshold_reason(fits_once, num_train, folds, few_shot, augmented)
            log.warning("%s The run has no threshold.", reason)
            return CalibrationSource("none", reason)
        setting = "calibration_images" if calibration_origin else "cross_fit"
    if setting == "calibration_images":
        if calibration_origin is None:
            raise ConfigError(
                "threshold.source=calibration_images needs calibration images: dataset.calibration_dir="
                "<folder of good parts> or dataset.calibration_fraction > 0"
                + (" (a few-shot run: dataset.shot_calibration > 0)" if few_shot else "")
            )
        return CalibrationSource(setting, calibration_origin)
    if not fits_once:
        raise ConfigError("threshold.source=cross_fit needs a fit-once method (PaDiM, PatchCore)")
    if num_train < 2 or augmented:
        views = "dataset.shot_augment=true (fold models would fit without the views)"
        why = views if augmented else f"{num_train} training image"
        raise ConfigError(
            f"threshold.source=cross_fit scores each training image by a model fitted on the others: not "
            f"with {why}. Give dataset.calibration_dir=<folder of good parts>, or threshold.source=none."
        )
    count = min(folds, num_train)  # tiny data: one image per fold
    return CalibrationSource(setting, f"cross-fit over the {num_train} training images ({count} folds)")


def no_threshold_reason(fits_once: bool, num_train: int, folds: int, few_shot: bool, augmented: bool) -> str:
    """Why ``threshold.source=auto`` found no normal images to calibrate on, and what would give some."""
    if not few_shot:
        return ("No normal images to calibrate a threshold on: set dataset.calibration_fraction > 0 or "
                "dataset.calibration_dir=<folder of good parts>.")  # fmt: skip
    why = f"a few-shot run has no normal images besides its k={num_train}"
    if fits_once and augmented:
        why += " and no cross-fit with dataset.shot_augment=true (fold models would fit without the views)"
    elif fits_once:
        why += (
            f", and a cross-fit over them needs k >= threshold.folds={folds} (with fewer, each fold model "
            "fits on too few of them to stand for the fitted one; threshold.source=cross_fit forces it)"
        )
    return (
        f"No threshold: {why}. The test set never calibrates. Give dataset.calibration_dir=<folder of "
        "good parts>, or dataset.shot_calibration=<n> to calibrate on n un-drawn training images."
    )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def guaranteed_rate(order: int, num_images: int, confidence: float) -> float:
    """The smallest α that the ``order``-th smallest of ``num_images`` normal scores guarantees at
    ``confidence``: 1 − the (1 − confidence) quantile of Beta(order, n − order + 1)."""
    return float(1 - stats.beta.ppf(1 - confidence, order, num_images - order + 1))


def check_budgets(false_alarm_rate: float, pixel_false_alarm_rate: float, confidence: float) -> None:
    """The budgets and the confidence, each in (0, 1); checked before any work (``threshold.*``)."""
    settings = {"false_alarm_rate": false_alarm_rate, "pixel_false_alarm_rate": pixel_false_alarm_rate,
                "confidence": confidence}  # fmt: skip
    for name, value in settings.items():
        if not (isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1):
            raise ConfigError(
                f"threshold.{name} must be a number in (0, 1), got {value!r} (e.g. 0.01 for a 1 % budget)"
            )


def guarantee(scores: Tensor, budget: float, confidence: float) -> Guarantee:
    """The smallest order statistic of ``scores [n]`` whose false-alarm rate is at most ``budget`` with
    ``confidence``; the largest score (the best that n images allow) when none is."""
    check_budgets(budget, budget, confidence)
    num_images = scores.numel()
    if num_images < 1:
        raise ConfigError("a threshold needs normal images to calibrate on, got none")
    # smallest k with P(Binomial(n, 1 - budget) <= k - 1) >= confidence
    order = int(stats.binom.ppf(confidence, num_images, 1 - budget)) + 1
    budget_met = order <= num_images
    order = min(order, num_images)
    threshold = float(scores.double().sort().values[order - 1])
    return Guarantee(threshold, order, num_images, guaranteed_rate(order, num_images, confidence), budget_met)


def clopper_pearson_upper(failures: int, trials: int, confidence: float) -> float:
    """One-sided Clopper–Pearson upper bound of a rate with ``failures`` of ``trials``."""
    return 1.0 if failures >= trials else float(stats.beta.ppf(confidence, failures + 1, trials - failures))


def fit_calibration(
    scores: Tensor,
    map_maxima: Tensor,
    false_alarm_rate: float,
    pixel_false_alarm_rate: float,
    confidence: float,
    source: str,
) -> Calibration:
    """Thresholds for image scores ``[n]`` and maps (by each image's map maximum ``[n]``) of n normal
    images the model did not fit on. Says in plain words when n cannot support the budget."""
    scores, map_maxima = scores.double().flatten(), map_maxima.double().flatten()
    image = guarantee(scores, false_alarm_rate, confidence)
    pixel = guarantee(map_maxima, pixel_false_alarm_rate, confidence)
    for what, result, budget in (("false-alarm", image, false_alarm_rate),
                                 ("pixel false-alarm", pixel, pixel_false_alarm_rate)):  # fmt: skip
        if not result.budget_met:
            log.warning(
                "With %d normal calibration images the lowest %s rate that can be guaranteed at %.0f %% is "
                "%.0f %%, above the budget of %g %%: using it. Add normal images (dataset.calibration_dir, "
                "dataset.calibration_fraction) or raise the budget.",
                result.num_images, what, 100 * confidence, 100 * result.guaranteed_rate, 100 * budget,
            )  # fmt: skip
    observed = int((scores > image.threshold).sum())
    return Calibration(
        threshold=image.threshold,
        pixel_threshold=pixel.threshold,
        normal_median=float(torch.quantile(scores, 0.5)),
        false_alarm_rate=false_alarm_rate,
        pixel_false_alarm_rate=pixel_false_alarm_rate,
        confidence=confidence,
        guaranteed_rate=image.guaranteed_rate,
        pixel_guaranteed_rate=pixel.guaranteed_rate,
        order=image.order,
        num_images=image.num_images,
        validation_upper_bound=clopper_pearson_upper(observed, image.num_images, confidence),
        source=source,
        scores=tuple(scores.tolist()),
        map_maxima=tuple(map_maxima.tolist()),
    )


def metrics_at_threshold(scores: Tensor, labels: Tensor, threshold: float) -> dict[str, float]:
    """Precision, recall, F1 and false-alarm rate of the decision ``score > threshold``."""
    predicted, labels = scores > threshold, labels.bool()
    true_positives = float((predicted & labels).sum())
    precision = true_positives / max(float(predicted.sum()), 1.0)
    recall = true_positives / max(float(labels.sum()), 1.0)
    return {
        "threshold": threshold,
        "precision_at_threshold": precision,
        "recall_at_threshold": recall,
        "f1_at_threshold": 2 * precision * recall / max(precision + recall, 1e-12),
        "false_alarm_rate": float((predicted & ~labels).sum()) / max(float((~labels).sum()), 1.0),
    }


def drift(batch_scores: Tensor, calibration: Calibration) -> dict[str, float]:
    """How far a batch's image scores moved from the calibration scores: the two-sample Kolmogorov–Smirnov
    statistic (largest gap between the two empirical distributions) and its p-value, and the share of the
    batch above the threshold. A batch of good parts like the calibration ones gives a large p-value."""
    if not calibration.scores or batch_scores.numel() == 0:
        return {}
    test = stats.ks_2samp(batch_scores.double().numpy(), list(calibration.scores))
    return {
        "drift_ks_statistic": float(test.statistic),
        "drift_p_value": float(test.pvalue),
        "share_above_threshold": float((batch_scores > calibration.threshold).double().mean()),
    }
