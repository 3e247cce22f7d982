"""BTAD, the beanTech anomaly detection data set (Mishra et al., "VT-ADL", ISIE 2021): three products.

``<root>/<01|02|03>/train/ok/*``, ``test/ok/*``, ``test/ko/*``, ``ground_truth/ko/<stem>.<png|bmp>``:
MVTec AD's layout with other names (``ok`` for good) and BMP or PNG images; a mask has its image's stem.
"""

from anomaly.data.mvtec import Layout, MVTecAD

BTAD_CATEGORIES = ("01", "02", "03")
BTAD_LAYOUT = Layout(
    train="train/ok",
    good="ok",
    mask_suffix="",
    hint="Download BTAD (btad.zip, from the VT-ADL paper's page or its mirrors), extract it and pass "
    "dataset.root=<folder holding 01, 02, 03>.",
)


class BTAD(MVTecAD):
    """One product of BTAD."""

    layout = BTAD_LAYOUT
    known_categories = BTAD_CATEGORIES
