"""The library API: docs/api.md's example runs as written; a detector scores every input kind alike."""

import re
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import anomaly
from anomaly.errors import ConfigError

pytestmark = pytest.mark.slow  # commands and whole runs: seconds to a minute each

DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_the_documented_example_runs_as_written(tmp_path, monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", DOCS.read_text(), re.DOTALL).group(1)
    (tmp_path / "example.py").write_text(code)
    monkeypatch.chdir(tmp_path)  # its outputs/ go here
    namespace = runpy.run_path(str(tmp_path / "example.py"))
    result, detection = namespace["result"], namespace["detection"]
    assert isinstance(result, anomaly.RunResult) and result.model_path.is_file()
    assert result.metrics["image_auroc"] > 0.9 and result.calibration.num_images == 60
    assert "from 60 normal images (the data set's own held-out normal images" in capsys.readouterr().out
    labels = torch.tensor([example["label"] for example in result.examples])
    run_scores = torch.tensor([example["score"] for example in result.examples])
    assert torch.allclose(detection.scores, run_scores, rtol=1e-5)  # the detector scores as the run tested
    assert detection.is_anomalous.tolist() == (run_scores > result.calibration.threshold).tolist()
    assert labels.tolist() != [] and detection.anomaly_maps.shape == (len(labels), 1, 64, 64)


def test_a_detector_scores_paths_pil_images_arrays_and_tensors_alike(padim_file, tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 80, 96, 3), dtype=np.uint8)  # another size than the model's 64 px
    paths = [tmp_path / f"{i}.png" for i in range(2)]
    for array, path in zip(pixels, paths, strict=True):
        Image.fromarray(array).save(path)
    with pytest.warns(UserWarning, match="randomly initialised"):
        detector = anomaly.load(padim_file.parent, device="cpu")
    by_path = detector.score(paths)
    tensors = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    for other in (
        [Image.open(path) for path in paths],
        list(pixels),
        tensors,  # a uint8 batch
        tensors.float() / 255,  # a [0, 1] float batch
    ):
        assert torch.allclose(detector.score(other).scores, by_path.scores, rtol=1e-5)
    assert detector.score(paths[0]).scores.shape == (1,)  # one image, not a list
    calibration = detector.calibration
    assert by_path.is_anomalous.tolist() == (by_path.scores > calibration.threshold).tolist()
    assert torch.equal(by_path.defect_masks, by_path.anomaly_maps > calibration.pixel_threshold)
    with pytest.raises(ConfigError, match=r"\[3, H, W\]"):
        detector.score(torch.rand(1, 64, 64))
    with pytest.raises(ConfigError, match=r"values in \[0, 1\]"):
        detector.score(torch.rand(3, 64, 64) * 2)
