"""Data sources: MVTec AD, plain folders and the built-in synthetic set, all as tables of samples."""
