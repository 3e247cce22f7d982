"""A deterministic synthetic data set in the MVTec AD layout: the default data (no download) and test data.

Each image is drawn from its own seed (data-set seed, category, split, index), so a file never depends on
how many images or which other categories are generated with it, and the same parameters always give
byte-identical PNGs. Normal images vary in pattern phase, pose, lighting and sensor noise, so a detector
has to model the surface rather than memorise pixels. A defect is blended in through a soft footprint
(``alpha``); the pixels it replaces by at least half form the ground-truth mask. (Over 300 lines: a small
renderer per surface and per defect type, kept together because they share the scene they draw on.)
"""

import fcntl
import itertools
import json
import shutil
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from anomaly.data.datamodule import Splits
from anomaly.data.mvtec import MVTEC_AD, MVTecAD
from anomaly.errors import ConfigError, OccupiedFolderError

CATEGORIES: tuple[str, ...] = ("fabric", "tile", "washer", "specks")
BENCHMARK_CATEGORIES = CATEGORIES[:3]  # experiment=benchmark_synthetic (specks is for tiling)
DEFECT_TYPES = ("scratch", "crack", "hole", "stain", "missing", "contamination", "color", "speck")

_CATEGORY_DEFECTS: dict[str, tuple[str, ...]] = {
    "fabric": ("hole", "stain", "color", "contamination", "missing"),
    "tile": ("crack", "scratch", "hole", "stain", "color"),
    "washer": ("scratch", "crack", "missing", "contamination", "color"),
    "specks": ("speck",),  # fabric with particles of a few pixels at any image size: for tiling
}
_SPLITS = {"train": 0, "test_good": 1, "test_defect": 2, "calibration": 3}
_GENERATOR_VERSION = 1  # bump when the images change, so that ensure_dataset regenerates old data
_MARKER = ".complete"

_WARP_RGB = np.array([0.64, 0.52, 0.40])
_WEFT_RGB = np.array([0.58, 0.48, 0.38])
_TILE_RGB = np.array([0.62, 0.60, 0.57])
_TILE_CHIPS = (  # terrazzo chips: colour, threshold in noise standard deviations, blob size at 256 px
    (np.array([0.30, 0.30, 0.31]), 1.9, 2.0),
    (np.array([0.88, 0.87, 0.84]), 2.0, 1.5),
    (np.array([0.55, 0.40, 0.32]), 2.4, 2.5),
)
_STEEL_RGB = np.array([0.76, 0.79, 0.84])
_TABLE_RGB = np.array([0.22, 0.24, 0.26])
_STAIN_TINTS = np.array([[1.0, 0.80, 0.58], [0.85, 0.86, 0.88], [1.0, 0.95, 0.62]])  # rust, grime, yellowing
_FOREIGN_RGB = np.array([[0.08, 0.08, 0.10], [0.60, 0.14, 0.10], [0.12, 0.20, 0.52], [0.95, 0.94, 0.90]])
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


@dataclass(frozen=True)
class _Scene:
    """A rendered surface before lighting and noise, with what defects need to know about it."""

    image: np.ndarray  # [H, W, 3] float, about [0, 1]
    support: np.ndarray  # [H, W] in [0, 1]: coverage of the part, where defects may go (ones for textures)
    behind: np.ndarray  # what a hole or a missing piece uncovers: backing cloth, broken stone, the table
    is_part: bool  # a part on a table (pieces go missing from its outline), else a texture filling the image
    period: float  # size of the pattern's repeat in pixels: the blur that erases it


def generate_dataset(
    root: str | Path,
    categories: Sequence[str] = ("fabric",),
    n_train: int = 60,
    n_test_good: int = 15,
    n_test_defect: int = 25,
    image_size: int = 256,
    seed: int = 0,
    n_calibration: int = 0,
) -> Path:
    """Writes ``<root>/<category>/{train/good, test/good, test/<defect>, ground_truth/<defect>}``, and with
    ``n_calibration`` normal calibration images ``validation/good`` (as MVTec LOCO and AD 2 hold them).

    Each category is built in a hidden staging folder and moved into place with its ``.complete`` marker,
    so an interrupted run never leaves a half category where a loader would find it. Returns ``root``.
    """
    root = Path(root)
    counts = (n_train, n_test_good, n_test_defect)
    for params in [_parameters(c, *counts, image_size, seed, n_calibration) for c in categories]:
        category = params["category"]
        staging = root / f".{category}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        _write_category(staging, params)
        (staging / _MARKER).write_text(json.dumps(params, sort_keys=True))
        shutil.rmtree(root / category, ignore_errors=True)
        staging.rename(root / category)
    return root


def ensure_dataset(
    root: str | Path,
    categories: Sequence[str] = ("fabric",),
    n_train: int = 60,
    n_test_good: int = 15,
    n_test_defect: int = 25,
    image_size: int = 256,
    seed: int = 0,
    n_calibration: int = 0,
) -> Path:
    """Generates the categories whose ``.complete`` marker is missing or records other parameters.

    Returns ``root``. A folder with another marker is regenerated; a non-empty folder without any
    marker is not ours (perhaps real data) and is refused rather than replaced. Several processes may call
    this at once (the ranks of a run, parallel jobs): one generates, the others wait for it and then find
    the marker (:func:`_generation_lock`).
    """
    root = Path(root)
    with _generation_lock(root):
        for category in categories:
            folder = root / category
            if folder.is_dir() and any(folder.iterdir()) and _read_marker(folder) is None:
                raise OccupiedFolderError(
                    f"{folder} exists but was not written by the generator (no {_MARKER} marker), so it is "
                    "not replaced: move it away or pass another dataset.root."
                )
        counts = (n_train, n_test_good, n_test_defect, image_size, seed, n_calibration)
        stale = [name for name in categories if _read_marker(root / name) != _parameters(name, *counts)]
        if stale:
            generate_dataset(root, stale, *counts)
    return root


@contextmanager
def _generation_lock(root: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``<root>/.generation.lock`` while the markers are read and written: the
    ranks of a run exist before any process group (torchrun, srun), so a file lock is what they share
    with each other and with unrelated jobs on one folder; the kernel drops it if its holder dies."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".generation.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _parameters(
    category: str,
    n_train: int,
    n_test_good: int,
    n_test_defect: int,
    image_size: int,
    seed: int,
    n_calibration: int = 0,
) -> dict:
    """Validated generation parameters of one category: also the content of its marker."""
    if category not in CATEGORIES:
        raise ConfigError(
            f"unknown synthetic category {category!r} (dataset.category): use one of {list(CATEGORIES)}, or "
            "dataset=folder / dataset=mvtec for your own images."
        )
    if n_train < 1 or n_test_good < 0 or n_test_defect < 0 or n_test_good + n_test_defect < 1:
        raise ConfigError(
            "The synthetic data set needs dataset.n_train >= 1, dataset.n_test_good >= 0, "
            f"dataset.n_test_defect >= 0 and at least one test image, got {n_train}, {n_test_good}, "
            f"{n_test_defect}."
        )
    if n_calibration < 0:
        raise ConfigError(f"dataset.n_calibration must be >= 0, got {n_calibration}")
    if image_size < 32 or seed < 0:
        raise ConfigError(
            "The synthetic data set needs dataset.generated_size >= 32 and dataset.generation_seed >= 0, "
            f"got {image_size} and {seed}."
        )
    return {
        "category": category,
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_defect": n_test_defect,
        "n_calibration": n_calibration,
        "image_size": image_size,
        "seed": seed,
        "version": _GENERATOR_VERSION,
    }


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return None


def _write_category(folder: Path, params: dict) -> None:
    category, size, seed = params["category"], params["image_size"], params["seed"]
    normal = (("train", "train/good"), ("test_good", "test/good"), ("calibration", "validation/good"))
    for split, subfolder in normal:
        for index in range(params.get(f"n_{split}", 0)):
            rng = _image_rng(seed, category, split, index)
            image = _photograph(rng, _RENDERERS[category](rng, size).image)
            _save_png(image, folder / subfolder / f"{index:03d}.png")
    defects = _CATEGORY_DEFECTS[category]
    for index in range(params["n_test_defect"]):
        defect = defects[index % len(defects)]
        stem = f"{index // len(defects):03d}"
        rng = _image_rng(seed, category, "test_defect", index)
        image, mask = _add_defect(rng, _RENDERERS[category](rng, size), defect)
        _save_png(_photograph(rng, image), folder / "test" / defect / f"{stem}.png")
        _save_png(mask.astype(np.uint8) * 255, folder / "ground_truth" / defect / f"{stem}_mask.png")


def _image_rng(seed: int, category: str, split: str, index: int) -> np.random.Generator:
    """A generator that depends only on what identifies the image (crc32: stable across processes)."""
    return np.random.default_rng([seed, zlib.crc32(category.encode()), _SPLITS[split], index])


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)  # [H, W, 3] uint8 -> RGB, [H, W] uint8 -> L


# ---------------------------------------------------------------- normal appearance


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Unit-variance noise with blobs about ``sigma`` px wide: white noise blurred by a Gaussian.

    The blur is circular (a product in Fourier space), so it costs the same at any ``sigma`` and leaves
    no border artefacts.
    """
    squared_frequency = np.fft.fftfreq(size)[:, None] ** 2 + np.fft.rfftfreq(size)[None] ** 2
    transfer = np.exp(-2 * (np.pi * sigma) ** 2 * squared_frequency)
    noise = np.fft.irfft2(np.fft.rfft2(rng.standard_normal((size, size))) * transfer, s=(size, size))
    return noise / noise.std()


def _centred_grid(size: int, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[:size, :size].astype(np.float64)
    return y - centre[0], x - centre[1]


def _fabric(rng: np.random.Generator, size: int) -> _Scene:
    """Plain weave: threads alternate over and under, each with its own thickness and dye variation."""
    period = max(4.0, 8.0 * size / 256) * rng.uniform(0.98, 1.02)
    angle = np.deg2rad(rng.uniform(-3.0, 3.0))
    y, x = _centred_grid(size, np.full(2, (size - 1) / 2))
    u = (x * np.cos(angle) + y * np.sin(angle)) / period + rng.uniform(0, 100)
    v = (y * np.cos(angle) - x * np.sin(angle)) / period + rng.uniform(0, 100)
    column, row = np.floor(u).astype(int), np.floor(v).astype(int)
    across_warp, across_weft = _thread_profile(u - column), _thread_profile(v - row)
    tone = 1 + 0.05 * rng.standard_normal((2, 64))
    warp = across_warp * tone[0, column % 64]
    weft = across_weft * tone[1, row % 64]
    warp_on_top = (column + row) % 2 == 0
    over = np.where(warp_on_top, warp * _thread_bend(v - row), weft * _thread_bend(u - column))
    shade = np.maximum(over, 0.45 * np.where(warp_on_top, weft, warp)) + 0.04 * _smooth_noise(rng, size, 0.8)
    colour = np.where(warp_on_top[..., None], _WARP_RGB, _WEFT_RGB) * rng.uniform(0.98, 1.02, 3)
    image = colour * (0.3 + 0.7 * shade[..., None])
    backing = rng.uniform(0.06, 0.12) * (1 + 0.2 * _smooth_noise(rng, size, 1.0))
    return _Scene(image, np.ones((size, size)), np.repeat(backing[..., None], 3, axis=2), False, 1.5 * period)


def _thread_profile(position: np.ndarray) -> np.ndarray:
    """Brightness across a round thread filling 85% of its cell (``position`` in [0, 1))."""
    return np.sqrt(np.clip(1 - ((position - 0.5) / 0.425) ** 2, 0, 1))


def _thread_bend(position: np.ndarray) -> np.ndarray:
    """A thread on top dips at both ends of its cell, where it goes under the crossing thread."""
    return 1 - 0.5 * (2 * position - 1) ** 2


def _tile(rng: np.random.Generator, size: int) -> _Scene:
    """Terrazzo-like stone: a mottled grey base with dark, light and rust-coloured chips."""
    scale = size / 256
    mottle = 0.035 * _smooth_noise(rng, size, 16 * scale) + 0.02 * _smooth_noise(rng, size, 4 * scale)
    image = _TILE_RGB * rng.uniform(0.98, 1.02) * (1 + mottle[..., None])
    for colour, threshold, chip_size in _TILE_CHIPS:
        chips = np.clip(4 * (_smooth_noise(rng, size, max(1.0, chip_size * scale)) - threshold), 0, 1)
        image += chips[..., None] * (colour - image)
    broken = image * rng.uniform(0.35, 0.55)
    return _Scene(image, np.ones((size, size)), broken, False, max(3.0, 6 * scale))


def _washer(rng: np.random.Generator, size: int) -> _Scene:
    """A turned steel tab washer on a matte table, shifted and turned a little, with its drop shadow."""
    scale = size / 256
    centre = (size - 1) / 2 + rng.uniform(-3, 3, 2) * scale
    y, x = _centred_grid(size, centre)
    radius, azimuth = np.hypot(y, x), np.arctan2(y, x)
    turn = rng.uniform(-4.0, 4.0) * np.pi / 180
    outer, inner = size * rng.uniform(0.355, 0.365), size * rng.uniform(0.148, 0.152)
    from_tab = (azimuth - turn - np.pi / 2 + np.pi) % (2 * np.pi) - np.pi  # angle to the tab in [-pi, pi)
    tab = np.exp(-((from_tab / 0.22) ** 4))
    inner_edge = inner - 0.05 * size * tab  # the tab juts into the bore: the pose is visible
    alpha = np.clip(outer - radius + 0.5, 0, 1) * np.clip(radius - inner_edge + 0.5, 0, 1)

    light = -2.3 + rng.uniform(-0.1, 0.1)
    facing = np.cos(azimuth - light)
    bevel = max(1.0, 1.5 * scale)
    outer_chamfer = np.exp(-(((outer - 2.5 * bevel - radius) / bevel) ** 2))
    inner_chamfer = np.exp(-(((radius - inner_edge - 2.5 * bevel) / bevel) ** 2))
    chamfers = 0.25 * facing * (outer_chamfer - inner_chamfer)  # they face opposite ways
    turning_marks = 0.02 * np.sin(2 * np.pi * radius / max(3.0, 4.0 * scale))
    sheen = 0.46 + 0.32 * facing**2 + chamfers + turning_marks  # brushed-metal sheen: cos(2 * angle)
    sheen = sheen + 0.02 * _smooth_noise(rng, size, 1.0)
    part = _STEEL_RGB * sheen[..., None]

    table = 1 + 0.04 * _smooth_noise(rng, size, 20 * scale) + 0.03 * _smooth_noise(rng, size, 1.0)
    shadow = ndimage.gaussian_filter(ndimage.shift(alpha, 3 * scale, order=1), 4 * scale)
    background = _TABLE_RGB * (table * (1 - 0.5 * shadow))[..., None]
    image = background + alpha[..., None] * (part - background)
    return _Scene(image, alpha, _TABLE_RGB * table[..., None], True, 4.0 * scale)


_RENDERERS: dict[str, Callable[[np.random.Generator, int], _Scene]] = {
    "fabric": _fabric,
    "tile": _tile,
    "washer": _washer,
    "specks": _fabric,
}


def _photograph(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """What changes between shots of one surface: uneven light, exposure, contrast and sensor noise."""
    size = image.shape[0]
    y, x = _centred_grid(size, np.full(2, (size - 1) / 2))
    direction = rng.uniform(0, 2 * np.pi)
    gradient = 1 + rng.uniform(0, 0.12) * (x * np.cos(direction) + y * np.sin(direction)) / size
    image = image * gradient[..., None]
    image = (image - 0.5) * rng.uniform(0.92, 1.08) + 0.5 + rng.uniform(-0.04, 0.04)
    image = image + rng.uniform(0.006, 0.014) * rng.standard_normal(image.shape)
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- defects


def _add_defect(rng: np.random.Generator, scene: _Scene, defect: str) -> tuple[np.ndarray, np.ndarray]:
    """Blends one defect into the scene; returns the image and its mask (footprint replaced at least half)."""
    for _ in range(10):  # a footprint can fall almost entirely off the part; draw again
        alpha, layer = _DEFECTS[defect](rng, scene)
        alpha = alpha * scene.support
        mask = alpha >= 0.5
        if mask.any():
            return scene.image + alpha[..., None] * (layer - scene.image), mask
    raise RuntimeError(f"could not place a {defect} defect")


def _centre(rng: np.random.Generator, scene: _Scene, on_outline: bool = False) -> np.ndarray:
    """A defect centre on the part, away from the image border; or on the part's outline."""
    support = scene.support
    allowed = (support > 0.05) & (support < 0.95) if on_outline else support > 0.99
    margin = support.shape[0] // 10
    allowed[:margin] = allowed[-margin:] = False
    allowed[:, :margin] = allowed[:, -margin:] = False
    candidates = np.flatnonzero(allowed)
    index = candidates[rng.integers(candidates.size)]
    return np.array(divmod(index, support.shape[1]), dtype=np.float64) + rng.uniform(-0.5, 0.5, 2)


def _blob(
    rng: np.random.Generator,
    size: int,
    centre: np.ndarray,
    area: tuple[float, float],
    softness: float,
    roughness: float,
    fray: float = 0.0,
) -> np.ndarray:
    """Irregular soft blob: a circle whose radius wobbles with angle; ``area`` is a range of image fractions.

    ``softness`` is the edge width relative to the radius; ``fray`` adds pixel-scale raggedness.
    """
    radius = np.sqrt(np.exp(rng.uniform(np.log(area[0]), np.log(area[1]))) * size**2 / np.pi)
    y, x = _centred_grid(size, centre)
    distance, azimuth = np.hypot(y, x), np.arctan2(y, x)
    harmonics = np.arange(2, 7)
    amplitudes = rng.uniform(0, roughness, harmonics.size) / harmonics
    phases = rng.uniform(0, 2 * np.pi, harmonics.size)
    wobble = np.tensordot(amplitudes, np.cos(harmonics[:, None, None] * azimuth + phases[:, None, None]), 1)
    edge = radius * (1 + wobble)
    if fray:
        edge = edge + fray * radius * _smooth_noise(rng, size, 1.0)
    return np.clip((edge - distance) / max(1.0, softness * radius) + 0.5, 0, 1)


def _walk(rng: np.random.Generator, length: float, step: float, bend: float, jag: float = 0.0) -> np.ndarray:
    """Polyline ``[N, 2]`` (y, x) from the origin; its heading drifts by ``bend`` and jitters by ``jag``."""
    steps = max(2, int(length / step))
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, bend, steps)) + rng.normal(0, jag, steps)
    moves = step * np.stack([np.sin(heading), np.cos(heading)], axis=1)
    return np.vstack([np.zeros(2), np.cumsum(moves, axis=0)])


def _stroke(path: np.ndarray, width: float, size: int) -> np.ndarray:
    """Anti-aliased coverage of a polyline ``width`` px wide, computed only inside its bounding box."""
    alpha = np.zeros((size, size))
    low = np.clip(np.floor(path.min(axis=0) - width), 0, size).astype(int)
    high = np.clip(np.ceil(path.max(axis=0) + width) + 1, 0, size).astype(int)
    if (high <= low).any():
        return alpha
    y, x = np.mgrid[low[0] : high[0], low[1] : high[1]].astype(np.float64)
    distance = np.full(y.shape, np.inf)
    for start, end in itertools.pairwise(path):
        delta = end - start
        t = np.clip(((y - start[0]) * delta[0] + (x - start[1]) * delta[1]) / max(delta @ delta, 1e-9), 0, 1)
        distance = np.minimum(distance, np.hypot(y - start[0] - t * delta[0], x - start[1] - t * delta[1]))
    alpha[low[0] : high[0], low[1] : high[1]] = np.clip(width / 2 + 0.5 - distance, 0, 1)
    return alpha


def _line_width(rng: np.random.Generator, size: int, low: float, high: float) -> float:
    """A width drawn in px at 256 px, never below what still covers a pixel at half strength."""
    return max(1.2, rng.uniform(low, high) * size / 256)


def _scratch(rng: np.random.Generator, scene: _Scene) -> tuple[np.ndarray, np.ndarray]:
    """A thin, gently curved line, lighter (polished) or darker (scored) than the surface."""
    size = scene.image.shape[0]
    path = _walk(rng, rng.uniform(0.2, 0.5) * size, max(1.0, 4 * size / 256), bend=0.04)
    path = path - path[len(path) // 2] + _centre(rng, scene)
    alpha = _stroke(path, _line_width(rng, size, 1.0, 2.5), size)
    if rng.random() < 0.5:
        return alpha, scene.image + (1 - scene.image) * rng.uniform(0.2, 0.5)
    return alpha, scene.image * rng.uniform(0.5, 0.75)


def _crack(rng: np.random.Generator, scene: _Scene) -> tuple[np.ndarray, np.ndarray]:
    """A jagged dark line with one to three side branches."""
    size = scene.image.shape[0]
    step = max(1.0, 3 * size / 256)
    trunk = _walk(rng, rng.uniform(0.25, 0.5) * size, step, bend=0.12, jag=0.5)
    trunk = trunk - trunk[len(trunk) // 2] + _centre(rng, scene)
    paths = [trunk]
    for _ in range(rng.integers(1, 4)):
        branch = _walk(rng, rng.uniform(0.06, 0.18) * size, step, bend=0.12, jag=0.5)
        paths.append(branch + trunk[rng.integers(len(trunk))])
    width = _line_width(rng, size, 1.2, 2.4)
    alpha = np.max([_stroke(path, width, size) for path in paths], axis=0)
    return alpha, scene.image * rng.uniform(0.2, 0.5)


def _hole(rng: np.random.Generator, scene: _Scene) -> tuple[np.ndarray, np.ndarray]:
    """A ragged hole through the surface (onto the backing cloth, into the stone)."""
    size = scene.image.shape[0]
    alpha = _blob(rng, size, _centre(rng, scene), (0.005, 0.035), softness=0.12, roughness=0.6, fray=0.08)
    return alpha, scene.behind


def _stain(rng: np.random.Generator, scene: _Scene) -> tuple[np.ndarray, np.ndarray]:
    """A soft-edged, tinted darkening that leaves the texture visible underneath."""
    size = scene.image.shape[0]
    alpha = _blob(rng, size, _centre(rng, scene), (0.01, 0.08), softness=0.5, roughness=0.6)
    tint = _STAIN_TINTS[rng.integers(len(_STAIN_TINTS))]
    return alpha, scene.image * tint * rng.uniform(0.6, 0.85)


def _missing(rng: np.random.Generator, scene: _Scene) -> tuple[np.ndarray, np.ndarray]:
    """Part: a chunk bitten out of its outline shows the table. Texture: a patch worn down to plain colour."""
    size = scene.image.shape[0]
    if scene.is_part:
        centre = _centre(rng, scene, on_outline=True)
        return _blob(rng, size, centre, (0.015, 0.05), softness=0.05, roughness=0.6), scene.behind
    alpha = _blob(rng, size, _centre(rng, scene), (0.02, 0.08), softness=0.15, roughness=0.4)
    worn = ndimage.gaussian_filter(scene.image, (scene.period, scene.period, 0), mode="nearest")
    return alpha, worn * rng.uniform(0.92, 1.08)


def _contamination(rng: np.random.Generator, scene: _Scene) -> tuple[np.ndarray, np.ndarray]:
    """A foreign fibre or particle of a colour the surface does not have."""
    size = scene.image.shape[0]
    centre = _centre(rng, scene)
    if rng.random() < 0.5:
        path = _walk(rng, rng.uniform(0.1, 0.25) * size, max(1.0, 3 * size / 256), bend=0.15)
        alpha = _stroke(path - path[len(path) // 2] + centre, _line_width(rng, size, 1.2, 2.0), size)
    else:
        alpha = _blob(rng, size, centre, (0.0015, 0.006), softness=0.1, roughness=0.8)
    colour = _FOREIGN_RGB[rng.integers(len(_FOREIGN_RGB))]
    return alpha, colour * (1 + 0.08 * _smooth_noise(rng, size, 1.0))[..., None]


def _color(rng: np.random.Generator, scene: _Scene) -> tuple[np.ndarray, np.ndarray]:
    """A region of changed hue at unchanged brightness (dye fault, heat tint)."""
    size = scene.image.shape[0]
    alpha = _blob(rng, size, _centre(rng, scene), (0.01, 0.08), softness=0.3, roughness=0.5)
    yiq = scene.image @ _RGB_TO_YIQ.T
    angle = rng.uniform(np.pi / 3, np.pi) * rng.choice([-1, 1])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    shift_angle = rng.uniform(0, 2 * np.pi)
    shift = rng.uniform(0.06, 0.12) * np.array([np.cos(shift_angle), np.sin(shift_angle)])
    chroma = 1.3 * yiq[..., 1:] @ rotation.T + shift
    return alpha, np.concatenate([yiq[..., :1], chroma], axis=-1) @ _YIQ_TO_RGB.T


def _speck(rng: np.random.Generator, scene: _Scene) -> tuple[np.ndarray, np.ndarray]:
    """One to three dark particles 3 to 6 px across whatever the image size: what resizing erases."""
    size = scene.image.shape[0]
    alpha = np.zeros((size, size))
    for _ in range(rng.integers(1, 4)):
        y, x = _centred_grid(size, _centre(rng, scene))
        alpha = np.maximum(alpha, np.clip(rng.uniform(1.5, 3.0) + 0.5 - np.hypot(y, x), 0, 1))
    return alpha, np.broadcast_to(_FOREIGN_RGB[0], scene.image.shape)


_DEFECTS: dict[str, Callable[[np.random.Generator, _Scene], tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _scratch,
    "crack": _crack,
    "hole": _hole,
    "stain": _stain,
    "missing": _missing,
    "contamination": _contamination,
    "color": _color,
    "speck": _speck,
}


class SyntheticAD(MVTecAD):
    """The generated data set as a data module: generated on first use, then read like MVTec AD.

    ``n_calibration`` generated normal images calibrate the threshold (as a data set's own held-out normal
    images: then every training image trains); more cost nothing but seconds, and a 1 % false-alarm budget
    at 95 % confidence needs at least 299.
    """

    known_categories = CATEGORIES

    def __init__(
        self,
        root: str,
        category: str | Sequence[str] = "fabric",
        n_train: int = 60,
        n_test_good: int = 15,
        n_test_defect: int = 25,
        generated_size: int = 256,
        generation_seed: int = 0,
        n_calibration: int = 0,
        **loader_options,
    ) -> None:
        super().__init__(root, category, **loader_options)
        self.generation = {
            "n_train": n_train,
            "n_test_good": n_test_good,
            "n_test_defect": n_test_defect,
            "image_size": generated_size,
            "seed": generation_seed,
            "n_calibration": n_calibration,
        }
        if n_calibration:
            self.layout = replace(MVTEC_AD, calibration="validation/good")

    def available_categories(self) -> list[str]:
        return list(CATEGORIES)  # generated when listed

    def load_category(self, category: str) -> Splits:
        ensure_dataset(self.root, [category], **self.generation)
        return super().load_category(category)
