"""Every command picks its device by one rule, and a device it cannot use is named before any work."""

import pytest
import torch

from anomaly.device import choose_device
from anomaly.errors import ConfigError


def test_auto_is_the_gpu_when_there_is_one_and_cpu_is_always_there():
    assert choose_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert choose_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["gpu", "mps", "cuda:x", "", 0])
def test_an_unknown_device_is_a_config_error_naming_the_choices(name):
    with pytest.raises(ConfigError, match=r"auto \(cuda when present\), cpu, cuda or cuda:<index>"):
        choose_device(name)


def test_a_gpu_this_machine_lacks_is_a_config_error_with_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"no CUDA GPU is visible here\. Pass device=cpu"):
        choose_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert choose_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match=r"2 CUDA GPU\(s\): cuda:0 to cuda:1"):
        choose_device("cuda:2")
