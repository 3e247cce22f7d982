"""EfficientAD (Batzner et al., WACV 2024)."""
