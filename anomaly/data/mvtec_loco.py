"""MVTec LOCO AD (Bergmann et al., IJCV 2022): logical and structural anomalies of five products.

``<root>/<category>/train/good/*.png``, ``validation/good/*.png`` (normal images held out by the data
set: they calibrate, never train), ``test/{good,logical_anomalies,structural_anomalies}/*.png``,
``ground_truth/<defect type>/<stem>/000.png, 001.png, ...``: one mask per defect of an image; the
image's mask is their union. The data set's own metric (sPRO, with per-defect saturation thresholds
from ``defects_config.json``) is not computed; pixel AUROC and AU-PRO are.
"""

from anomaly.data.mvtec import Layout, MVTecAD

LOCO_CATEGORIES = ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors")
LOCO_LAYOUT = Layout(
    calibration="validation/good",
    mask_folders=True,
    hint="Download MVTec LOCO AD from mvtec.com/company/research/datasets/mvtec-loco, extract it and pass "
    "dataset.root=<folder holding the category folders>.",
)


class MVTecLOCO(MVTecAD):
    """One category of MVTec LOCO AD."""

    layout = LOCO_LAYOUT
    known_categories = LOCO_CATEGORIES
