"""Content-addressed cache of the frozen backbone's features, shared by the runs of a sweep and by epochs.

The features of an image depend only on the preprocessed image tensor and the backbone (its name, the
weights of its graph up to the deepest layer asked for, BatchNorm folding and precision), the device type
and torch's version. The key hashes exactly these (:func:`backbone_fingerprint`, :func:`image_key`): a
file's path or time never matters, and any change of preprocessing (size, crop, tiling) is another tensor
and so another key. A value is one image's maps ``{layer: [C, h, w]}`` in a safetensors file (data, never
code), as its batch computed them. The file names its layers, so one that holds more layers serves a
request for fewer of the same graph (PaDiM's layer1-3 serve PatchCore's layer2+3, bit for bit: one backbone
pass for both); one that lacks a layer asked for is a miss, and the batch that computes it rewrites it.

A batch is read from the cache only when every image of it is there; otherwise the whole batch is
computed, as without a cache (so a cold run equals an uncached one bit for bit), and its missing images
are stored. Writes go to a temporary file renamed into place: a reader never sees a partial file, and two
writers of one key each rename a whole file. A damaged file (unreadable, wrong layers or shape,
non-finite) is logged with its name, deleted and recomputed. A disk that refuses a write turns the cache
off with one warning. The size cap evicts the least recently used files (a read touches its mtime).
"""

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from uuid import uuid4

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from anomaly.backbones.feature_extractor import FeatureExtractor

log = logging.getLogger(__name__)
SUFFIX = ".safetensors"
CHANNELS_LAST = "channels_last"  # metadata key: the layers whose batch came channels-last (layout kept)
EVICT_TO = 0.9  # an over-full cache is trimmed to this share of its cap


def backbone_fingerprint(extractor: FeatureExtractor, device_type: str) -> str:
    """sha256 of what the features depend on besides the image: class, name, precision, every weight of the
    graph (which ends at the deepest layer; after BatchNorm folding), the normalisation, the device type
    and torch's version. Not the layers: each file names its own (:class:`FeatureCache`)."""
    digest = hashlib.sha256()
    described = (type(extractor).__qualname__, extractor.name, extractor.precision, device_type,
                 torch.__version__)  # fmt: skip
    digest.update(repr(described).encode())
    tensors = {**extractor.state_dict(), "mean": extractor.mean, "std": extractor.std}
    for name, tensor in sorted(tensors.items()):
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        digest.update(_bytes(tensor))
    return digest.hexdigest()


def image_key(fingerprint: str, image: Tensor) -> str:
    """The cache key of one preprocessed image ``[3, H, W]`` for the backbone ``fingerprint`` names."""
    digest = hashlib.sha256(fingerprint.encode())
    digest.update(f"{image.dtype}:{list(image.shape)}".encode())
    digest.update(_bytes(image))
    return digest.hexdigest()


def _bytes(tensor: Tensor) -> memoryview:
    return memoryview(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy())


class FeatureStore:
    """Cache files under ``root`` (``<key[:2]>/<key>.safetensors``), at most ``max_bytes`` in all."""

    def __init__(self, root: Path | str, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.writable = True  # until a write fails: then one warning and no more writes
        self._size: int | None = None  # bytes in the cache as this process last counted them

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{SUFFIX}"

    def read(self, key: str) -> tuple[dict[str, Tensor], dict[str, str]] | None:
        """The tensors and metadata stored under ``key``; None when absent or unreadable (then deleted)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(path, "pt") as file:
                metadata = dict(file.metadata() or {})
                tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
        except Exception as error:  # any damage (truncated, corrupt, not safetensors) means: recompute
            self.discard(key, f"unreadable ({type(error).__name__}: {error})")
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # the least recently used files are evicted first
        return tensors, metadata

    def write(self, key: str, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
        """Stores ``tensors`` under ``key`` atomically; a refused write turns the store off, warning once."""
        if not self.writable:
            return
        path = self.path(key)
        temporary = path.with_name(f".{key}.{uuid4().hex}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                save_file(tensors, temporary, metadata)
                os.replace(temporary, path)
            finally:
                temporary.unlink(missing_ok=True)
            added = path.stat().st_size
        except Exception as error:  # read-only or full disk (safetensors wraps some OSErrors)
            self.writable = False
            log.warning("Feature cache: cannot write to %s (%s): no cache for the rest of this run (same "
                        "results, computed each time). Free space or set paths.cache_dir, or cache=false.",
                        self.root, error)  # fmt: skip
            return
        self._size = (self.size() if self._size is None else self._size) + added
        if self._size > self.max_bytes:
            self._size = self.evict(int(self.max_bytes * EVICT_TO))

    def layers(self, key: str) -> set[str]:
        """The layers the file of ``key`` holds (none when there is no readable file)."""
        try:
            with safe_open(self.path(key), "pt") as file:
                return set(file.keys())
        except Exception:  # absent or damaged: the next read finds out which, and says so
            return set()

    def discard(self, key: str, problem: str) -> None:
        """Deletes the damaged file of ``key``, saying which file and why."""
        path = self.path(key)
        log.warning("Feature cache: %s is %s; deleted, its features are recomputed.", path, problem)
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)

    def files(self) -> list[tuple[Path, os.stat_result]]:
        """Every cache file with its stat (one that another process deletes meanwhile is left out)."""
        found = []
        for path in self.root.glob(f"*/*{SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                found.append((path, path.stat()))
        return found

    def size(self) -> int:
        """Bytes of all cache files."""
        return sum(stat.st_size for _, stat in self.files())

    def evict(self, target: int) -> int:
        """Deletes the least recently used files until at most ``target`` bytes remain; returns the bytes."""
        files = sorted(self.files(), key=lambda entry: entry[1].st_mtime_ns)
        total = sum(stat.st_size for _, stat in files)
        for path, stat in files:
            if total <= target:
                break
            path.unlink(missing_ok=True)
            total -= stat.st_size
        return total

    def clear(self) -> int:
        """Deletes every cache file (and leftover temporary files); returns the bytes freed."""
        freed = 0
        for path in [*self.root.glob(f"*/*{SUFFIX}"), *self.root.glob("*/.*.tmp")]:
            try:
                freed += path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                pass
        return freed


@dataclass
class FeatureCache:
    """The cache one run uses: a :class:`FeatureStore` and how many images it read and computed.

    Set as ``extractor.cache`` on every :class:`~anomaly.backbones.FeatureExtractor` of a model
    (:func:`use_cache`); the extractor's ``forward`` then goes through :meth:`features`. Copies of a
    model share it (``__deepcopy__``): one run, one count.
    """

    store: FeatureStore
    read: int = 0  # images whose features came from the cache
    computed: int = 0  # images whose features the backbone computed

    def __post_init__(self) -> None:
        self._fingerprints: dict[tuple[int, str], str] = {}

    def __deepcopy__(self, memo: dict) -> "FeatureCache":
        return self

    def counts(self) -> dict[str, int]:
        return {"images_read": self.read, "images_computed": self.computed}

    def features(self, extractor: FeatureExtractor, images: Tensor) -> dict[str, Tensor]:
        """``extractor.compute(images)`` ``{layer: [B, C, h, w]}``, read from the cache when every image of
        the batch is there, else computed and the missing images stored."""
        if images.requires_grad:  # a gradient through the input (never in the methods): no cache
            return extractor.compute(images)
        fingerprint = self._fingerprint(extractor, images.device.type)
        keys = [image_key(fingerprint, image) for image in images]
        cached = self._read_all(extractor, keys, tuple(images.shape[-2:]))
        if cached is not None:
            self.read += len(keys)
            return {layer: tensor.to(images.device) for layer, tensor in cached.items()}
        features = extractor.compute(images)
        self.computed += len(keys)
        self._store(keys, features)
        return features

    def _fingerprint(self, extractor: FeatureExtractor, device_type: str) -> str:
        """Computed once per extractor and device type (hashing WideResNet50's weights takes ~0.5 s)."""
        slot = (id(extractor), device_type)
        if slot not in self._fingerprints:
            self._fingerprints[slot] = backbone_fingerprint(extractor, device_type)
        return self._fingerprints[slot]

    def _read_all(
        self, extractor: FeatureExtractor, keys: list[str], size: tuple[int, int]
    ) -> dict[str, Tensor] | None:
        """The batch's features from the cache, in the layout they were computed in; None at the first
        image that is missing or damaged (the whole batch is then computed)."""
        per_image, channels_last = [], set()
        for key in keys:
            entry = self.store.read(key)
            if entry is None:
                return None
            tensors, metadata = entry
            if not set(extractor.layers) <= set(tensors):  # another extractor's layers: computed, rewritten
                return None
            if problem := _problem(tensors, extractor, size, per_image[0] if per_image else None):
                self.store.discard(key, problem)
                return None
            per_image.append(tensors)
            channels_last = set(filter(None, metadata.get(CHANNELS_LAST, "").split(",")))
        batch = {}
        for layer in extractor.layers:
            stacked = torch.stack([tensors[layer] for tensors in per_image])
            layout = torch.channels_last if layer in channels_last else torch.contiguous_format
            batch[layer] = stacked.contiguous(memory_format=layout)
        return batch

    def _store(self, keys: list[str], features: dict[str, Tensor]) -> None:
        """Each image's maps as the batch computed them; non-finite features are not stored."""
        if not self.store.writable:
            return
        layout = ",".join(
            layer for layer, f in features.items() if f.is_contiguous(memory_format=torch.channels_last)
        )
        for index, key in enumerate(keys):
            if set(features) <= self.store.layers(key):
                continue
            tensors = {layer: f[index].detach().cpu().contiguous() for layer, f in features.items()}
            if all(bool(torch.isfinite(tensor).all()) for tensor in tensors.values()):
                self.store.write(key, tensors, {CHANNELS_LAST: layout})


def _problem(
    tensors: dict[str, Tensor],
    extractor: FeatureExtractor,
    size: tuple[int, int],
    first: dict[str, Tensor] | None,
) -> str | None:
    """What is wrong with a cache file's tensors for this extractor and input size; None if nothing."""
    for layer, channels, stride in zip(extractor.layers, extractor.channels, extractor.strides, strict=True):
        tensor = tensors[layer]
        grid = tensor.shape[1:] if tensor.dim() == 3 else (-stride, -stride)  # a wrong rank: no grid
        grid_ok = all(abs(n - side / stride) < 1 for n, side in zip(grid, size, strict=True))
        if tensor.dtype != torch.float32 or tensor.shape[0] != channels or not grid_ok:
            return f"of the wrong shape or type ({layer}: {tensor.dtype} {list(tensor.shape)})"
        if first is not None and tensor.shape != first[layer].shape:
            return f"of another shape than the batch's other images ({layer}: {list(tensor.shape)})"
        if not bool(torch.isfinite(tensor).all()):
            return f"non-finite ({layer} holds NaN or infinity)"
    return None


def use_cache(model: nn.Module, cache: FeatureCache | None) -> None:
    """Every frozen feature extractor of ``model`` reads and writes ``cache`` (None: none)."""
    for module in model.modules():
        if isinstance(module, FeatureExtractor):
            module.cache = cache
