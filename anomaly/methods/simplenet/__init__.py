"""SimpleNet (Liu et al., CVPR 2023): a discriminator that tells adapted normal features from noised ones."""
