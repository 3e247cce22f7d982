"""MVTec AD 2 (Heckler-Kram et al., 2025): eight objects, larger images, harder lighting.

``<root>/<object>/train/good/*.png``, ``validation/good/*.png`` (normal images held out by the data set:
they calibrate, never train), ``test_public/{good,bad}/*.png`` with ``test_public/ground_truth/bad/
<stem>_mask.png``, and ``test_private/``, ``test_private_mixed/`` without ground truth. The test metrics
come from test_public; the private sets are scored after testing and written as the official evaluation
server takes them (:mod:`anomaly.reports.submissions`).
"""

from anomaly.data.mvtec import Layout, MVTecAD
from anomaly.data.samples import Sample, list_images
from anomaly.errors import ConfigError

AD2_CATEGORIES = ("can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial", "wallplugs", "walnuts")
AD2_LAYOUT = Layout(
    test="test_public",
    ground_truth="test_public/ground_truth",
    good="good",
    calibration="validation/good",
    hint="Download MVTec AD 2 from mvtec.com/company/research/datasets/mvtec-ad-2, extract it and pass "
    "dataset.root=<folder holding the object folders>.",
)
PRIVATE_SETS = ("test_private", "test_private_mixed")


class MVTecAD2(MVTecAD):
    """One object of MVTec AD 2; its private test sets are written for the evaluation server."""

    layout = AD2_LAYOUT
    known_categories = AD2_CATEGORIES
    submission_format = "mvtec_ad2"

    def __init__(self, root: str, category: str, **loader_options) -> None:
        super().__init__(root, category, **loader_options)
        if self.preprocessing.crop_size is not None:
            raise ConfigError(
                "MVTec AD 2's evaluation takes maps of whole images: use dataset.crop_size=null"
            )
        if self.categories is not None:
            raise ConfigError(
                "MVTec AD 2's private test sets are submitted per object, so a model per object: "
                f"dataset.category must name one object, got {self.category}"
            )

    def unlabeled_sets(self) -> dict[str, list[Sample]]:
        sets = {}
        for name in PRIVATE_SETS:
            folder = self.root / self.category / name
            if folder.is_dir():
                sets[name] = [Sample(path, 0, None, name) for path in list_images(folder, self.skipped)]
        return sets
