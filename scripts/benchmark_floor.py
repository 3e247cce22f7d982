"""The conventional floor of a data set: PIL decoding + resizing and the published backbone, nothing else.

``../shared/peer/RESULTS.md`` measures the floor this way (the image library everyone uses, the network as
published, glibc's default malloc settings), so this script gives the same figure next to our runs;
``benchmark_stages.py`` reports the floor as our own pipeline pays it (torchcodec decoding, BatchNorms
folded, freed memory reused). Images: ``<root>/<category>/train/good/*`` and ``<root>/<category>/test/*/*``,
resized to 256 × 256, read by 2 DataLoader workers, then Lite0's PaDiM layers at batch 32. Example::

    python scripts/benchmark_floor.py ../shared/data/mvtec_ad bottle
"""

import argparse
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from anomaly.backbones import FeatureExtractor
from anomaly.data.decode import IMAGE_EXTENSIONS


class PilImages(Dataset):
    def __init__(self, paths: list[Path], size: int) -> None:
        self.paths = paths
        self.transform = v2.Compose(
            [v2.Resize([size, size], antialias=True), v2.ToDtype(torch.float32, scale=True)]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.paths[index]) as image:
            return self.transform(v2.functional.pil_to_tensor(image.convert("RGB")))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", type=Path, help="folder holding the category folder (MVTec AD layout)")
    parser.add_argument("category")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    folder = args.root / args.category
    paths = sorted(
        p
        for p in [*folder.glob("train/good/*"), *folder.glob("test/*/*")]
        if p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not paths:
        raise SystemExit(f"no images under {folder}/train/good or {folder}/test/*")
    start = time.perf_counter()
    loader = DataLoader(
        PilImages(paths, args.image_size), batch_size=args.batch_size, num_workers=args.workers
    )
    batches = list(loader)
    decode_s = time.perf_counter() - start
    backbone = FeatureExtractor(
        "efficientnet_lite0", ["blocks.1", "blocks.2", "blocks.4"], fold_batch_norms=False
    )
    with torch.inference_mode():
        start = time.perf_counter()
        for images in batches:
            backbone(images)
        backbone_s = time.perf_counter() - start
    print(
        f"{args.category}: {len(paths)} images, decode + resize {decode_s:.2f} s,"
        f" backbone {backbone_s:.2f} s, conventional floor {decode_s + backbone_s:.2f} s"
        f" ({torch.get_num_threads()} threads)"
    )


if __name__ == "__main__":
    main()
