"""anomaly: paper-faithful industrial visual anomaly detection, configured with Hydra, run with Lightning.

The library in three calls (docs/api.md)::

    cfg = anomaly.compose(["method=padim", "dataset=folder", "dataset.root=/data/screws"])
    result = anomaly.run(cfg)              # fit, calibrate, test, write the run dir: a RunResult
    detector = anomaly.load(result.model_path)
    detection = detector.score(["part_001.png", "part_002.png"])
"""

__version__ = "0.1.0"

from anomaly.config import compose
from anomaly.detector import Detection, Detector, load
from anomaly.experiment import RunResult, run

__all__ = ["Detection", "Detector", "RunResult", "compose", "load", "run"]
