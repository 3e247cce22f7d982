"""SimpleNet (Liu et al., CVPR 2023), following the official code (DonaldRR/SimpleNet).

Frozen backbone features are aggregated as in PatchCore (3×3 neighbourhoods on two layers, pooled to
D); a linear adaptor maps them to a training-friendly space; anomalous features are synthesised by
adding Gaussian noise to the adapted normal ones, and a small discriminator learns to score normal
features high and noised ones low. A test patch's anomaly score is the negated discriminator output.
"""

import torch
from torch import Tensor, nn

from anomaly.methods.base import AnomalyOutput
from anomaly.methods.patchcore.model import aggregate_patch_features
from anomaly.methods.postprocess import upsample_and_blur


def _xavier_init(module: nn.Module) -> None:
    """The official init: Xavier-normal weights for every Linear (biases keep torch's default)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight)


class SimpleNet(nn.Module):
    """Feature adaptor + discriminator over locally aware patch features of a frozen backbone.

    Args:
        backbone: frozen feature extractor; ``forward(images) -> {layer: [B, C, h, w]}``, the first layer
            being the finest (its grid is the patch grid).
        pre_embed_dim: each layer's flattened ``C·p·p`` patch is average-pooled to this length.
        target_embed_dim: the concatenated layers are average-pooled to this length, D.
        patch_size: side p of the neighbourhood aggregated around each position (odd).
        discriminator_hidden: width of the discriminator's hidden layer (official: 1024 for D = 1536).
        noise_std: standard deviation of the Gaussian noise that turns adapted features into fake ones.
        margin: th of the truncated L1 loss: normal scores are pushed above th, fake ones below -th.
        blur_sigma: Gaussian smoothing of the upsampled map, in input pixels (official: 4).
    """

    def __init__(
        self,
        backbone: nn.Module,
        pre_embed_dim: int = 1536,
        target_embed_dim: int = 1536,
        patch_size: int = 3,
        discriminator_hidden: int = 1024,
        noise_std: float = 0.015,
        margin: float = 0.5,
        blur_sigma: float = 4.0,
    ) -> None:
        super().__init__()
        if patch_size < 1 or patch_size % 2 == 0:
            raise ValueError(f"patch_size must be odd and positive, got {patch_size}")
        self.backbone = backbone
        self.pre_embed_dim = pre_embed_dim
        self.target_embed_dim = target_embed_dim
        self.patch_size = patch_size
        self.noise_std = noise_std
        self.margin = margin
        self.blur_sigma = blur_sigma
        self.adaptor = nn.Linear(target_embed_dim, target_embed_dim)  # official Projection, 1 layer
        self.discriminator = nn.Sequential(
            nn.Linear(target_embed_dim, discriminator_hidden),
            nn.BatchNorm1d(discriminator_hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(discriminator_hidden, 1, bias=False),
        )
        self.apply(_xavier_init)

    def patch_features(self, images: Tensor) -> Tensor:
        """``[B, h, w, D]`` frozen patch features of ``images [B, 3, H, W]``; never carries a gradient."""
        with torch.no_grad():
            feature_maps = list(self.backbone(images).values())
            return aggregate_patch_features(
                feature_maps, self.patch_size, self.pre_embed_dim, self.target_embed_dim
            )

    def training_loss(self, images: Tensor) -> dict[str, Tensor]:
        """Truncated L1 loss on the ``B·h·w`` patches of a batch of normal images.

        Normal and fake features go through the discriminator as one batch, as in the official code,
        so its BatchNorm normalises with statistics of both. ``p_true``/``p_fake`` are the shares of
        patches already beyond the margin (no gradient).
        """
        true_features = self.adaptor(self.patch_features(images).flatten(0, 2))  # [N, D]
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
        features = self.patch_features(images)  # [B, h, w, D]
        batch, height, width, dim = features.shape
        patch_scores = -self.discriminator(self.adaptor(features.reshape(-1, dim)))  # [B·h·w, 1]
        patch_scores = patch_scores.reshape(batch, 1, height, width)
        anomaly_map = upsample_and_blur(patch_scores, tuple(images.shape[-2:]), self.blur_sigma)
        return AnomalyOutput(anomaly_map, patch_scores.amax(dim=(1, 2, 3)))
