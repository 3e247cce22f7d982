"""SimpleNet (Liu et al., CVPR 2023), following the official code (DonaldRR/SimpleNet).

Frozen backbone features are aggregated as in PatchCore (3×3 neighbourhoods on two layers, pooled to
D); a linear adaptor maps them to a training-friendly space; anomalous features are synthesised by
adding Gaussian noise to the adapted normal ones, and a small discriminator learns to score normal
features high and noised ones low. A test patch's anomaly score is the negated discriminator output.
"""

import math

import torch
from torch import Tensor, nn

from anomaly.backbones.patch_features import PatchFeatures
from anomaly.errors import ConfigError
from anomaly.methods.base import AnomalyOutput, TrainedModel
from anomaly.methods.postprocess import check_blur_sigma, upsample_and_blur


def _xavier_init(module: nn.Module) -> None:
    """The official init: Xavier-normal weights for every Linear (biases keep torch's default)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight)


class SimpleNet(TrainedModel):
    """Feature adaptor + discriminator over locally aware patch features of a frozen backbone.

    Args:
        features: the frozen locally aware patch features, D = ``features.dim`` (official: layer2+3 of
            WideResNet50, 3×3, pooled to 1536 and 1536).
        discriminator_hidden: width of the discriminator's hidden layer (official: 1024 for D = 1536).
        noise_std: standard deviation of the Gaussian noise that turns adapted features into fake ones.
        margin: th of the truncated L1 loss: normal scores are pushed above th, fake ones below -th.
        blur_sigma: Gaussian smoothing of the upsampled map, in input pixels (official: 4).
    """

    def __init__(
        self,
        features: PatchFeatures,
        discriminator_hidden: int = 1024,
        noise_std: float = 0.015,
        margin: float = 0.5,
        blur_sigma: float = 4.0,
    ) -> None:
        super().__init__()
        if not (discriminator_hidden >= 1 and 0 < noise_std < math.inf and 0 < margin < math.inf):
            raise ConfigError(
                "discriminator_hidden, noise_std and margin must be positive and finite, got "
                f"{discriminator_hidden}, {noise_std}, {margin}"
            )
        check_blur_sigma(blur_sigma)
        self.features = features
        self.noise_std = noise_std
        self.margin = margin
        self.blur_sigma = blur_sigma
        dim = features.dim
        self.adaptor = nn.Linear(dim, dim)  # official Projection, 1 layer
        self.discriminator = nn.Sequential(
            nn.Linear(dim, discriminator_hidden),
            nn.BatchNorm1d(discriminator_hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(discriminator_hidden, 1, bias=False),
        )
        self.apply(_xavier_init)

    @property
    def is_fitted(self) -> bool:
        return True  # trained or not, the adaptor and discriminator score (untrained: meaninglessly)

    def training_loss(self, images: Tensor) -> dict[str, Tensor]:
        """Truncated L1 loss on the ``B·h·w`` patches of a batch of normal images.

        Normal and fake features go through the discriminator as one batch, as in the official code,
        so its BatchNorm normalises with statistics of both. ``p_true``/``p_fake`` are the shares of
        patches already beyond the margin (no gradient).
        """
        true_features = self.adaptor(self.features(images).flatten(0, 2))  # [N, D]
        fake_features = true_features + self.noise_std * torch.randn_like(true_features)
        scores = self.discriminator(torch.cat([true_features, fake_features])).squeeze(1)  # [2N]
        true_scores, fake_scores = scores.chunk(2)
        loss_true = (self.margin - true_scores).clamp(min=0).mean()
        loss_fake = (fake_scores + self.margin).clamp(min=0).mean()
        return {
            "loss": loss_true + loss_fake,
            "loss_true": loss_true,
            "loss_fake": loss_fake,
            "p_true": (true_scores.detach() >= self.margin).float().mean(),
            "p_fake": (fake_scores.detach() < -self.margin).float().mean(),
        }

    @torch.no_grad()
    def forward(self, images: Tensor) -> AnomalyOutput:
        """Anomaly map ``[B, 1, H, W]`` (upsampled, blurred -D) and image score ``[B]`` (max patch score).

        No noise is drawn here, so in eval mode (BatchNorm on its running statistics) it is deterministic.
        """
        features = self.features(images)  # [B, h, w, D]
        batch, height, width, dim = features.shape
        patch_scores = -self.discriminator(self.adaptor(features.reshape(-1, dim)))  # [B·h·w, 1]
        patch_scores = patch_scores.reshape(batch, 1, height, width)
        image_size = tuple(images.shape[-2:])
        axes = self.features.grid_axes(image_size)
        anomaly_map = upsample_and_blur(patch_scores, axes, image_size, self.blur_sigma)
        return AnomalyOutput(anomaly_map, patch_scores.amax(dim=(1, 2, 3)))
