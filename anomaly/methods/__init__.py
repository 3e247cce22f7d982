"""The methods by name: what a method config's ``name`` and a model file's ``method`` refer to.

This mapping is also the allow-list of :mod:`anomaly.model_io`: a model file can only ever rebuild
one of these classes. A new method adds its line here (see "Extending" in the README).
"""

from torch import nn

from anomaly.methods.efficientad.model import EfficientAD
from anomaly.methods.padim.model import Padim
from anomaly.methods.patchcore.model import PatchCore
from anomaly.methods.simplenet.model import SimpleNet

METHODS: dict[str, type[nn.Module]] = {
    "padim": Padim,
    "patchcore": PatchCore,
    "simplenet": SimpleNet,
    "efficientad": EfficientAD,
}
