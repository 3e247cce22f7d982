"""EfficientAD (Batzner et al., WACV 2024), following the reference code (nelson1425/EfficientAD).

A frozen patch description network (PDN) teacher, distilled beforehand from a pretrained backbone, gives
384-d features for every 33×33 patch. A student PDN with twice the channels learns to predict them on
normal images (its first half, trained only on the hardest 0.1 % of the squared differences) and to
predict an autoencoder's reconstruction of them (its second half). At test time the structural map is
the student-teacher difference, the logical map the student-autoencoder difference; each is mapped by
its 0.9 and 0.995 quantiles on held-out normal images to 0 and 0.1, and the map is their mean.

Everything is one ``nn.Module``; every statistic (teacher channel mean/std, map quantiles) is a buffer
set through an explicit method, so ``state_dict()`` is the whole fitted model.
"""

import itertools
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import v2

from anomaly.backbones.feature_cache import FrozenNetwork
from anomaly.backbones.feature_extractor import IMAGENET_MEAN, IMAGENET_STD
from anomaly.backbones.geometry import GridGeometry
from anomaly.distributed import LOCAL, Collective
from anomaly.errors import ConfigError, DataError
from anomaly.methods.base import AnomalyOutput, TrainedModel, register_fitted_buffer
from anomaly.methods.postprocess import upsample_and_blur
from anomaly.methods.statistics import ChannelStatistics

MODEL_SIZES = ("small", "medium")
TEACHER_HELP = (
    "EfficientAD needs a distilled PDN teacher (it is never trained from a random one). Either pass "
    "method.model.teacher_weights=<file> with published EfficientAD weights (teacher_small.pth / "
    "teacher_medium.pth of nelson1425/EfficientAD, matching method.model.model_size), or distil one "
    "offline from a pretrained backbone: anomaly-distill-teacher image_dir=<folder of generic images> "
    "model_size=<small|medium> (it writes outputs/teachers/teacher_<size>_<backbone>.pth)."
)


def patch_description_network(out_channels: int, model_size: str, padding: bool = False) -> nn.Sequential:
    """PDN of EfficientAD-S or -M: ``[B, 3, H, W]`` → ``[B, out_channels, h, w]`` (h = 56 at H = 256).

    Its receptive field is 33 px. A ``Sequential`` whose indices match the published teacher files'
    keys (``0.weight``, ``3.weight``, ...). ``padding=True`` (distillation only, as the reference) keeps
    a larger output grid (64 at 256 px); it changes no parameter, so weights move between the two.
    """
    pad = 1 if padding else 0
    if model_size == "small":
        return nn.Sequential(
            nn.Conv2d(3, 128, kernel_size=4, padding=3 * pad),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(kernel_size=2, stride=2, padding=pad),
            nn.Conv2d(128, 256, kernel_size=4, padding=3 * pad),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(kernel_size=2, stride=2, padding=pad),
            nn.Conv2d(256, 256, kernel_size=3, padding=pad),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, out_channels, kernel_size=4),
        )
    if model_size == "medium":
        return nn.Sequential(
            nn.Conv2d(3, 256, kernel_size=4, padding=3 * pad),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(kernel_size=2, stride=2, padding=pad),
            nn.Conv2d(256, 512, kernel_size=4, padding=3 * pad),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(kernel_size=2, stride=2, padding=pad),
            nn.Conv2d(512, 512, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(512, 512, kernel_size=3, padding=pad),
            nn.ReLU(inplace=True),
            nn.Conv2d(512, out_channels, kernel_size=4),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=1),
        )
    raise ConfigError(f"model_size must be one of {MODEL_SIZES}, got {model_size!r}")


class Teacher(FrozenNetwork):
    """The distilled PDN, frozen: ``[B, 3, H, W]`` images in [0, 1] → ``{"output": [B, C, h, w]}``, its raw
    features of the ImageNet-normalised images.

    Its layers are its own children ``0``, ``1``, ... as the published teacher files name them (a model
    file's ``teacher.0.weight``). As a :class:`FrozenNetwork` its ``forward`` reads the feature cache where
    a run has one: EfficientAD calls it on unaugmented images only, :meth:`compute` on augmented ones.
    """

    def __init__(self, out_channels: int, model_size: str) -> None:
        super().__init__()
        self.layers = ["output"]
        self.out_channels = out_channels
        for name, layer in patch_description_network(out_channels, model_size).named_children():
            self.add_module(name, layer)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def compute(self, images: Tensor) -> dict[str, Tensor]:
        x = (images - self.mean) / self.std
        for layer in self.children():
            x = layer(x)
        return {"output": x.float()}  # float32 as every frozen network's (a no-op outside autocast)


class AutoEncoder(nn.Module):
    """The reference autoencoder: six stride-2 convolutions and an 8×8 one down to a 64-d code, then six
    stages of bilinear upsampling, 4×4 convolution, ReLU and dropout (``dropout``, the references' 0.2,
    active in training only) and a head back to the teacher's ``[B, out_channels, h, w]`` grid.

    The decoder's intermediate sizes are derived from the input size as anomalib does; at 256 px they
    are the reference's 3, 8, 15, 32, 63, 127. Below 256 px the encoder's last map is smaller than the
    8×8 kernel and is zero-padded to it (equivalent to using the kernel's centre); at 256 px and above
    nothing changes.
    """

    def __init__(self, out_channels: int, dropout: float = 0.2) -> None:
        super().__init__()
        channels = [3, 32, 32, 64, 64, 64]  # five stride-2 convolutions: 256 px → 8×8
        self.encoder = nn.Sequential()
        for c_in, c_out in itertools.pairwise(channels):
            self.encoder.extend([nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1), nn.ReLU()])
        self.bottleneck = nn.Conv2d(64, 64, kernel_size=8)
        self.up_convs = nn.ModuleList(nn.Conv2d(64, 64, kernel_size=4, padding=2) for _ in range(6))
        self.dropout = nn.Dropout(dropout)  # after each of the six stages, as the references (training only)
        self.head = nn.Sequential(
            nn.Conv2d(64, 64, kernel_size=3, padding=1), nn.ReLU(), nn.Conv2d(64, out_channels, 3, padding=1)
        )

    def forward(self, images: Tensor, output_size: tuple[int, int]) -> Tensor:
        """``images [B, 3, H, W]`` (normalised) → ``[B, out_channels, *output_size]``."""
        x = self.encoder(images)
        short = [max(0, 8 - side) for side in x.shape[-2:]]
        if any(short):
            x = F.pad(x, (short[1] // 2, short[1] - short[1] // 2, short[0] // 2, short[0] - short[0] // 2))
        x = self.bottleneck(x)
        for size, conv in zip(_decoder_sizes(images.shape[-2:]), self.up_convs, strict=True):
            x = self.dropout(F.relu(conv(F.interpolate(x, size=size, mode="bilinear"))))
        return self.head(F.interpolate(x, size=output_size, mode="bilinear"))


def _decoder_sizes(image_size: torch.Size) -> list[tuple[int, int]]:
    """Upsampling sizes of the six decoder stages (3, 8, 15, 32, 63, 127 per side at 256 px)."""
    steps = [(64, -1), (32, 0), (16, -1), (8, 0), (4, -1), (2, -1)]
    return [tuple(max(1, side // div + add) for side in image_size) for div, add in steps]


class EfficientAD(TrainedModel):
    """Teacher, student and autoencoder; ``forward`` gives the anomaly map and score of ``[0, 1]`` images.

    Args:
        teacher_weights: a PDN state dict file (published EfficientAD teacher or ``anomaly-distill-teacher``
            output) for ``model_size``, loaded here; required for training (see ``TEACHER_HELP``). A
            saved model holds its teacher, so it is rebuilt without the file (``None``).
        model_size: ``"small"`` (EfficientAD-S) or ``"medium"`` (EfficientAD-M).
        out_channels: teacher (and autoencoder) channels; the student has twice as many (paper: 384).
        hard_quantile: the student-teacher loss averages the squared differences at or above this
            quantile (paper: 0.999).
        quantile_low, quantile_high: map quantiles on normal images mapped to 0 and 0.1 (paper: 0.9, 0.995).
        autoencoder_dropout: dropout after each decoder stage, in training only (references: 0.2; 0 turns
            it off, for ablations).
    """

    training_only_arguments = ("teacher_weights",)
    normalization_share = 0.5  # half the calibration images give the map quantiles, half the threshold

    def __init__(
        self,
        teacher_weights: str | None = None,
        model_size: str = "small",
        out_channels: int = 384,
        hard_quantile: float = 0.999,
        quantile_low: float = 0.9,
        quantile_high: float = 0.995,
        autoencoder_dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if not 0 < quantile_low < quantile_high < 1 or not 0 < hard_quantile < 1:
            raise ConfigError(
                "need 0 < quantile_low < quantile_high < 1 and 0 < hard_quantile < 1, got "
                f"{quantile_low}, {quantile_high}, {hard_quantile}"
            )
        if not 0 <= autoencoder_dropout < 1:
            raise ConfigError(f"autoencoder_dropout must be in [0, 1), got {autoencoder_dropout}")
        self.model_size = model_size
        self.out_channels = out_channels
        self.hard_quantile = hard_quantile
        self.quantile_low = quantile_low
        self.quantile_high = quantile_high
        self.teacher = Teacher(out_channels, model_size)
        self.student = patch_description_network(2 * out_channels, model_size)
        self.geometry = GridGeometry()  # where the PDN's cells lie: cell i on pixel 4i + 16 (33-px field)
        self.autoencoder = AutoEncoder(out_channels, autoencoder_dropout)
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        register_fitted_buffer(self, "teacher_mean")  # [1, C, 1, 1]
        register_fitted_buffer(self, "teacher_std")  # [1, C, 1, 1]
        register_fitted_buffer(self, "quantiles_st")  # [2]: (q_a, q_b) of the student-teacher map
        register_fitted_buffer(self, "quantiles_ae")  # [2]: (q_a, q_b) of the student-autoencoder map
        # the paper's AE augmentation: one of brightness, contrast, saturation jitter (0.2), chosen per image
        self.ae_augment = v2.RandomChoice(
            [v2.ColorJitter(brightness=0.2), v2.ColorJitter(contrast=0.2), v2.ColorJitter(saturation=0.2)]
        )
        self.teacher_loaded = teacher_weights is not None  # never train on a random teacher
        if teacher_weights is not None:
            load_teacher(self.teacher, Path(teacher_weights), model_size)

    def prepare(self, batches: Iterable[Tensor], collective: Collective = LOCAL) -> None:
        """The teacher's per-channel mean and std over all positions of the training images (unaugmented,
        as the reference's: the feature cache keeps these outputs for the training steps)."""
        if not self.teacher_loaded:
            raise ConfigError(TEACHER_HELP)
        statistics = ChannelStatistics()
        for images in batches:
            statistics.update(self.teacher_features(images))
        mean, std = statistics.compute(collective)
        self.teacher_mean = mean.reshape(1, -1, 1, 1).to(self.image_mean)
        self.teacher_std = std.reshape(1, -1, 1, 1).to(self.image_mean)

    def finalize(self, batches: Iterable[Tensor], collective: Collective = LOCAL) -> None:
        """The map quantiles (q_a, q_b) of the ST and AE maps over normal images it did not train on (the
        paper's validation images; disjoint from those that calibrate the threshold)."""
        maps = [self.raw_maps(images) for images in batches]
        if not maps:
            raise DataError(
                "EfficientAD normalises its maps with quantiles of normal images it did not train on, but "
                "there are none: set dataset.calibration_fraction > 0 (the method's defaults set 0.2: half "
                "for the quantiles, half for the threshold) or dataset.calibration_dir=<good parts>."
            )
        # with several processes each holds its block of the held-out images: the quantiles are over all
        quantiles = [
            self.map_quantiles(collective.gather_rows(torch.cat(kind))) for kind in zip(*maps, strict=True)
        ]
        for name, (low, high) in zip(("student-teacher", "autoencoder"), quantiles, strict=True):
            if not high > low:
                raise DataError(
                    f"The {name} map quantiles ({float(low):.4g}, {float(high):.4g}) do not increase: the "
                    "held-out maps are (nearly) constant, so scores would not be defined. Train longer "
                    "(method.max_steps) or hold out more normal images (dataset.calibration_fraction)."
                )
        self.quantiles_st, self.quantiles_ae = (q.reshape(2).to(self.image_mean) for q in quantiles)

    def map_quantiles(self, maps: Tensor) -> Tensor:
        """``[2]``: the (q_a, q_b) quantiles of raw maps ``[N, 1, h, w]`` (from :meth:`raw_maps`)."""
        return torch.stack([quantile(maps, self.quantile_low), quantile(maps, self.quantile_high)])

    @property
    def has_teacher_normalisation(self) -> bool:
        return self.teacher_mean.numel() > 0

    @property
    def is_fitted(self) -> bool:
        return self.has_teacher_normalisation and self.quantiles_st.numel() > 0

    def normalise_images(self, images: Tensor) -> Tensor:
        """``[0, 1]`` images → ImageNet-normalised, the teacher's input convention."""
        return (images - self.image_mean) / self.image_std

    @torch.no_grad()
    def teacher_features(self, images: Tensor) -> Tensor:
        """Raw (unnormalised) teacher output ``[B, C, h, w]`` of unaugmented ``[0, 1]`` images: read from
        the feature cache where the run has one (training, map-normalisation and test images alike)."""
        return self.teacher(images)["output"]

    def _standardised(self, teacher_output: Tensor) -> Tensor:
        """Teacher features standardised per channel by the training images' statistics."""
        return (teacher_output - self.teacher_mean) / self.teacher_std

    def training_loss(self, images: Tensor, penalty_images: Tensor | None = None) -> dict[str, Tensor]:
        """The paper's loss on a batch of normal ``[0, 1]`` images ``[B, 3, H, W]``.

        ``penalty_images`` (generic images, e.g. ImageNet, same size) add the penalty that keeps the
        student from imitating the teacher outside the normal data.
        """
        if not self.has_teacher_normalisation:
            raise RuntimeError("prepare() must run on the training images before training EfficientAD")
        c = self.out_channels
        x_st = self.normalise_images(images)  # unaugmented, as the reference's "image_st"
        distance_st = (self._standardised(self.teacher_features(images)) - self.student(x_st)[:, :c]) ** 2
        hard = quantile(distance_st.detach(), self.hard_quantile)  # over the whole batch, as the reference
        losses = {"loss_st": distance_st[distance_st >= hard].mean()}
        if penalty_images is not None:
            losses["loss_penalty"] = (self.student(self.normalise_images(penalty_images))[:, :c] ** 2).mean()

        augmented = torch.stack([self.ae_augment(image) for image in images])
        x_ae = self.normalise_images(augmented)
        teacher_ae = self._standardised(self.teacher.compute(augmented)["output"])  # new each step: uncached
        ae_output = self.autoencoder(x_ae, teacher_ae.shape[-2:])
        losses["loss_ae"] = ((teacher_ae - ae_output) ** 2).mean()
        losses["loss_stae"] = ((ae_output - self.student(x_ae)[:, c:]) ** 2).mean()
        return {"loss": sum(losses.values()), **losses}

    @torch.no_grad()
    def raw_maps(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Unnormalised student-teacher and student-autoencoder maps ``[B, 1, h, w]`` on the PDN grid."""
        if not self.has_teacher_normalisation:
            raise RuntimeError("EfficientAD has no teacher normalisation: train it or load a trained model")
        c = self.out_channels
        x = self.normalise_images(images)
        teacher = self._standardised(self.teacher_features(images))
        student = self.student(x)
        ae_output = self.autoencoder(x, teacher.shape[-2:])
        map_st = ((teacher - student[:, :c]) ** 2).mean(dim=1, keepdim=True)
        map_ae = ((ae_output - student[:, c:]) ** 2).mean(dim=1, keepdim=True)
        return map_st, map_ae

    @torch.no_grad()
    def forward(self, images: Tensor) -> AnomalyOutput:
        """``[B, 3, H, W]`` images in [0, 1] → map ``[B, 1, H, W]`` (0.5·ST + 0.5·AE) and score (its max).

        The PDN-grid map is interpolated onto the image with each cell on the pixel its receptive field is
        centred on (the reference pads it by 4 zero cells and stretches it over the image instead: 1.5 px
        off at 256 px, more at other sizes); beyond the outer cells' centres the edge values continue.
        """
        if not self.is_fitted:
            raise RuntimeError("EfficientAD is not fitted: train it (anomaly-train) or load a trained model")
        map_st, map_ae = self.raw_maps(images)
        map_st = 0.1 * (map_st - self.quantiles_st[0]) / (self.quantiles_st[1] - self.quantiles_st[0])
        map_ae = 0.1 * (map_ae - self.quantiles_ae[0]) / (self.quantiles_ae[1] - self.quantiles_ae[0])
        image_size = tuple(images.shape[-2:])
        axes = self.geometry(self.teacher, image_size)[0]
        anomaly_map = upsample_and_blur(0.5 * map_st + 0.5 * map_ae, axes, image_size, sigma=0)
        return AnomalyOutput(anomaly_map, anomaly_map.amax(dim=(1, 2, 3)))


def quantile(values: Tensor, q: float) -> Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) in O(N), without its 2^24-element limit."""
    flat = values.flatten()
    position = q * (flat.numel() - 1)
    index = int(position)
    low = flat.kthvalue(index + 1).values
    high = flat.kthvalue(min(index + 2, flat.numel())).values
    return low + (high - low) * (position - index)


def load_teacher(teacher: Teacher, path: Path, model_size: str) -> None:
    """Loads a PDN state dict (keys ``0.weight``, ``0.bias``, ...) with errors that name the file."""
    if not path.is_file():
        raise ConfigError(f"Teacher weights {path} do not exist. {TEACHER_HELP}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle/zip errors differ by torch version; all mean "not this format"
        raise ConfigError(
            f"Cannot read teacher weights {path} as a torch state dict of tensors: {error}"
        ) from error
    expected = {k: tuple(v.shape) for k, v in teacher.state_dict().items()}
    out_channels = teacher.out_channels
    found = (
        {k: tuple(v.shape) for k, v in state.items() if isinstance(v, Tensor)}
        if isinstance(state, dict)
        else {}
    )
    if found != expected:
        raise ConfigError(
            f"Teacher weights {path} do not fit the {model_size} PDN (model_size={model_size!r}). "
            f"Expected {expected}; the file has {found or type(state).__name__}. Use a teacher distilled "
            f"for model_size={model_size!r} with out_channels={out_channels}."
        )
    teacher.load_state_dict(state)
