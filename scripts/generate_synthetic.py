"""Writes the synthetic MVTec-AD-layout data set (the project's default data) and lists what it wrote.

Example (with the package installed, ``pip install -e .``):

    python scripts/generate_synthetic.py --root outputs/data/synthetic --categories fabric tile --seed 0
"""

import argparse
import time
from pathlib import Path

from anomaly.data.synthetic import CATEGORIES, generate_dataset


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--root", default="outputs/data/synthetic", help="folder for the category folders")
    parser.add_argument("--categories", nargs="+", choices=CATEGORIES, default=list(CATEGORIES))
    parser.add_argument("--n-train", type=int, default=60, help="normal training images per category")
    parser.add_argument("--n-test-good", type=int, default=15, help="normal test images per category")
    parser.add_argument("--n-test-defect", type=int, default=25, help="defective test images per category")
    parser.add_argument("--image-size", type=int, default=256, help="side of the square images in pixels")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    args = parser.parse_args()

    start = time.perf_counter()
    counts = (args.n_train, args.n_test_good, args.n_test_defect)
    root = generate_dataset(args.root, args.categories, *counts, args.image_size, args.seed)
    seconds = time.perf_counter() - start
    for category in args.categories:
        for folder in sorted({path.parent for path in (root / category).rglob("*.png")}):
            print(f"{folder}: {sum(1 for _ in folder.glob('*.png'))} files")
    print(f"wrote {len(args.categories)} categories under {Path(root)} in {seconds:.1f} s")


if __name__ == "__main__":
    main()
