"""PatchCore (Roth et al., CVPR 2022): a coreset-subsampled memory bank of locally aware patch features."""
