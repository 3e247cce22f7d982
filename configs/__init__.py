"""Hydra configs of anomaly; installed as the package ``anomaly.configs`` (see setup.py)."""
