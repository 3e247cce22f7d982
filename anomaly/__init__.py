"""anomaly: paper-faithful industrial visual anomaly detection, configured with Hydra, run with Lightning."""

__version__ = "0.1.0"
