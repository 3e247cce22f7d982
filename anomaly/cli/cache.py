"""anomaly-cache: the backbone feature cache's size, or clearing it.

``anomaly-cache info [DIR]`` prints how many images' features it holds and their size on disk (and the
decoded images and passed data checks beside them: :mod:`anomaly.data.decoded_cache`);
``anomaly-cache clear [DIR]`` deletes them. DIR defaults to ``outputs/feature_cache`` (``paths.cache_dir``
of a run started in this folder). Runs refill the cache as they need it: clearing never changes a result.
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

from anomaly.backbones.feature_cache import FeatureStore
from anomaly.cli.runtime import report_user_errors
from anomaly.data.decoded_cache import DECODED
from anomaly.errors import UserError

DEFAULT_DIR = Path("outputs") / "feature_cache"


def describe(store: FeatureStore) -> str:
    """The features' count and size, and the decoded images' and remembered data checks' beside them."""
    files = store.files()
    features = [stat for path, stat in files if path.parent.parent == store.root]
    decoded = [stat for path, stat in files if path.parent.parent != store.root]
    size, decoded_size = (sum(stat.st_size for stat in group) for group in (features, decoded))
    per_image = f", {size / len(features) / 1e6:.2f} MB per image" if features else ""
    return (
        f"{store.root}: {len(features)} images' features, {size / 1e9:.3f} GB{per_image}; "
        f"{len(decoded)} decoded images and passed data checks ({DECODED}/), {decoded_size / 1e9:.3f} GB"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="anomaly-cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["info", "clear"])
    parser.add_argument("cache_dir", nargs="?", type=Path, default=DEFAULT_DIR,
                        help=f"the cache folder (paths.cache_dir; default {DEFAULT_DIR})")  # fmt: skip
    arguments = parser.parse_args(argv)
    report_user_errors(lambda: run(arguments.action, arguments.cache_dir))


def run(action: str, cache_dir: Path) -> None:
    if cache_dir.exists() and not cache_dir.is_dir():
        raise UserError(f"{cache_dir} is a file, not a feature cache folder: pass the folder that "
                        "paths.cache_dir names.")  # fmt: skip
    store = FeatureStore(cache_dir, max_bytes=0)
    if action == "clear":
        freed = store.clear()
        print(f"{cache_dir}: deleted {freed / 1e9:.3f} GB of cached features.")
    else:
        print(describe(store))


if __name__ == "__main__":
    main()
