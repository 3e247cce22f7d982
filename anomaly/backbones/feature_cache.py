"""Content-addressed cache of frozen networks' outputs, shared by the runs of a sweep and by epochs.

A :class:`FrozenNetwork` (the methods' pretrained backbone, :class:`~anomaly.backbones.FeatureExtractor`;
EfficientAD's distilled teacher; SimpleNet's patch features around the backbone) never changes its weights
in a run, so its output for an image depends only on the preprocessed image tensor and the network (its
class, its weights, e.g. a backbone's graph up to the deepest layer asked for after BatchNorm folding, and
its precision), the device type and torch's version.
The key hashes exactly these (:func:`network_fingerprint`, :func:`image_key`): a file's path or time never
matters, and any change of preprocessing (size, crop, tiling) is another tensor and so another key. A value
is one image's maps ``{layer: [C, h, w]}`` in a safetensors file (data, never code), as its batch computed
them. The file names its layers, so one that holds more layers serves a
request for fewer of the same graph (PaDiM's layer1-3 serve PatchCore's layer2+3, bit for bit: one backbone
pass for both); one that lacks a layer asked for is a miss, and the batch that computes it rewrites it.

A batch is read from the cache only when every image of it is there; otherwise the whole batch is
computed, as without a cache (so a cold run equals an uncached one bit for bit), and its missing images
are stored. Writes go to a temporary file renamed into place: a reader never sees a partial file, and two
writers of one key each rename a whole file. A damaged file (unreadable, wrong layers or shape,
non-finite) is logged with its name, deleted and recomputed. A disk that refuses a write turns the cache
off with one warning. The size cap evicts the least recently used files (a read touches its mtime); the
size is one count that every process writing the folder keeps (:meth:`FeatureStore.write`), so the cap
holds for a sweep's parallel jobs and DDP ranks together.
"""

import contextlib
import fcntl
import hashlib
import logging
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import uuid4

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from anomaly.errors import ConfigError

log = logging.getLogger(__name__)
SUFFIX = ".safetensors"
CHANNELS_LAST = "channels_last"  # metadata key: the layers whose batch came channels-last (layout kept)
EVICT_TO = 0.9  # an over-full cache is trimmed to this share of its cap
SIZE = ".size"  # in the cache folder: the bytes of all its files, one count every writer keeps (and locks)
SIZE_DIGITS = 20  # the count is rewritten in place at this width (a truncated file costs ext4 a flush)


class FrozenNetwork(nn.Module):
    """A network that stays as it is in a run (eval mode, no gradient steps): the feature cache may hold
    its outputs.

    ``images [B, 3, H, W]`` in [0, 1] → ``{layer: [B, C, h, w]}`` (float32, ``layers`` in order). ``forward``
    reads them from the cache that :func:`use_cache` set (None: none) or computes them; :meth:`compute` is
    the uncached entry point, which always runs the network: for inputs seen once (augmented images) and
    for probes that must see its convolutions run (:class:`~anomaly.backbones.geometry.GridGeometry`).
    A subclass sets ``layers`` and implements :meth:`compute`, and :meth:`description` where more than its
    weights and class decide its outputs.
    """

    layers: list[str]

    def __init__(self) -> None:
        super().__init__()
        self.cache: FeatureCache | None = None  # not in the state dict: a run's resource
        self._shapes: dict[tuple[int, int], dict[str, torch.Size]] = {}

    def train(self, mode: bool = True) -> "FrozenNetwork":
        """Stays in eval: BatchNorm statistics belong to the pretrained weights; Lightning calls train()."""
        return super().train(False)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.compute(images) if self.cache is None else self.cache.features(self, images)

    def compute(self, images: Tensor) -> dict[str, Tensor]:
        """The network's outputs of ``images`` (see :class:`FrozenNetwork`), never from the cache."""
        raise NotImplementedError

    def description(self) -> tuple:
        """Plain values besides the class and the weights that decide the outputs (e.g. a precision)."""
        return ()

    def output_shapes(self, image_size: tuple[int, int]) -> dict[str, torch.Size]:
        """``{layer: [C, h, w]}`` of one image of ``image_size``: from one zero image through
        :meth:`compute`, once per size (what a cache file must hold)."""
        if image_size not in self._shapes:
            parameter = next(self.parameters(), None)
            device = parameter.device if parameter is not None else torch.device("cpu")
            with torch.no_grad():
                outputs = self.compute(torch.zeros(1, 3, *image_size, device=device))
            self._shapes[image_size] = {layer: output.shape[1:] for layer, output in outputs.items()}
        return self._shapes[image_size]


def network_fingerprint(network: FrozenNetwork, device_type: str) -> str:
    """sha256 of what the outputs depend on besides the image: the class, its :meth:`description`, every
    parameter and buffer (a backbone's graph ends at its deepest layer; after BatchNorm folding; its
    normalisation), the device type and torch's version. Not the layers: each file names its own
    (:class:`FeatureCache`)."""
    digest = hashlib.sha256()
    described = (type(network).__qualname__, network.description(), device_type, torch.__version__)
    digest.update(repr(described).encode())
    tensors = {**dict(network.named_parameters()), **dict(network.named_buffers())}
    for name, tensor in sorted(tensors.items()):
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        digest.update(_bytes(tensor))
    return digest.hexdigest()


def image_key(fingerprint: str, image: Tensor) -> str:
    """The cache key of one preprocessed image ``[3, H, W]`` for the network ``fingerprint`` names."""
    digest = hashlib.sha256(fingerprint.encode())
    digest.update(f"{image.dtype}:{list(image.shape)}".encode())
    digest.update(_bytes(image))
    return digest.hexdigest()


def _bytes(tensor: Tensor) -> memoryview:
    return memoryview(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy())


class FeatureStore:
    """Cache files under ``root`` (``<folder>/<key[:2]>/<key>.safetensors``; features in ``root`` itself,
    other kinds in a folder of their own: :meth:`within`), at most ``max_bytes`` in all.

    Several processes (a sweep's parallel jobs, DDP ranks) may write one folder. The bytes of all its files
    are one count in ``root/.size`` that each write adds to while it holds an exclusive ``flock`` on that
    file (21 bytes read and rewritten in place: ~20 us; the file write itself stays the cost); when the
    count passes the cap, the writer evicts, still under the lock, from the folder's real size and stores
    that. So the cap holds for all processes together, up to the files being written at that moment; a
    count that is missing or unreadable is taken from the folder again.
    """

    def __init__(self, root: Path | str, max_bytes: int, folder: str = "") -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.folder = folder
        self._writable = [True]  # until a write fails: then one warning and no more writes (shared by within)

    @property
    def writable(self) -> bool:
        return self._writable[0]

    def within(self, folder: str) -> "FeatureStore":
        """The same cache (its cap, count, eviction and a refused write's switch-off cover both) writing its
        files in ``folder``."""
        store = FeatureStore(self.root, self.max_bytes, folder)
        store._writable = self._writable
        return store

    def path(self, key: str) -> Path:
        return self.root / self.folder / key[:2] / f"{key}{SUFFIX}"

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
        """Stores ``tensors`` under ``key`` atomically and counts them against the cap; a refused write
        turns the store off, warning once."""
        if not self.writable:
            return
        path = self.path(key)
        temporary = path.with_name(f".{key}.{uuid4().hex}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            replaced = path.stat().st_size if path.is_file() else 0  # a rewrite with more layers
            try:
                save_file(tensors, temporary, metadata)
                os.replace(temporary, path)
            finally:
                temporary.unlink(missing_ok=True)
            self._count(path.stat().st_size - replaced)
        except Exception as error:  # read-only or full disk (safetensors wraps some OSErrors)
            if not self._writable[0]:
                return  # another thread of this process said it already
            self._writable[0] = False
            log.warning("Feature cache: cannot write to %s (%s): no cache for the rest of this run (same "
                        "results, computed each time). Free space or set paths.cache_dir, or cache=false.",
                        self.root, error)  # fmt: skip

    def _count(self, added: int) -> None:
        """Adds ``added`` bytes to the count all writers share; past the cap, evicts (under the lock)."""
        with self._locked() as descriptor:
            counted = _read_count(descriptor)
            total = self.size() if counted is None else counted + added  # (a new count includes the file)
            if total > self.max_bytes:
                total = self.evict(int(self.max_bytes * EVICT_TO))
            os.pwrite(descriptor, f"{total:0{SIZE_DIGITS}d}\n".encode(), 0)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        """The count file, open and locked by this process alone (the lock goes with the process)."""
        descriptor = os.open(self.root / SIZE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield descriptor
        finally:
            os.close(descriptor)

    def layers(self, key: str) -> set[str]:
        """The layers the file of ``key`` holds (none when there is no readable file)."""
        try:
            with safe_open(self.path(key), "pt") as file:
                return set(file.keys())
        except Exception:  # absent or damaged: the next read finds out which, and says so
            return set()

    def discard(self, key: str, problem: str) -> None:
        """Deletes the damaged file of ``key``, saying which file and why (the shared count keeps its bytes
        until the next eviction counts the folder: the cap errs towards evicting early)."""
        path = self.path(key)
        log.warning("Feature cache: %s is %s; deleted, its features are recomputed.", path, problem)
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)

    def files(self) -> list[tuple[Path, os.stat_result]]:
        """Every cache file of every folder with its stat (one that another process deletes meanwhile is
        left out)."""
        found = []
        for path in self.root.rglob(f"*{SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                found.append((path, path.stat()))
        return found

    def size(self) -> int:
        """Bytes of all cache files, counted in the folder."""
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
        for path in [*self.root.rglob(f"*{SUFFIX}"), *self.root.rglob(".*.tmp")]:
            try:
                freed += path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                pass
        (self.root / SIZE).unlink(missing_ok=True)  # the next write counts the folder
        return freed


@dataclass
class FeatureCache:
    """The cache one run uses: a :class:`FeatureStore` and how many images it read and computed.

    Set as ``network.cache`` on every :class:`FrozenNetwork` of a model (:func:`use_cache`); the network's
    ``forward`` then goes through :meth:`features`. Copies of a model share it (``__deepcopy__``): one run,
    one count.
    """

    store: FeatureStore
    read: int = 0  # images whose features came from the cache
    computed: int = 0  # images that a network computed without a cached network inside it (the backbone)

    def __post_init__(self) -> None:
        # calls of features(): a network whose compute looked its inner one up (PatchFeatures around the
        # backbone) is not counted beside it, so each image counts once, read or computed
        self._lookups = 0
        # per network (weakly held: a fold's model that is gone frees its slot) and device type
        self._fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def open(cls, root: Path | str, max_gb: object) -> "FeatureCache":
        """The cache in ``root`` capped at ``max_gb`` gigabytes (checked: a positive number)."""
        if not isinstance(max_gb, int | float) or isinstance(max_gb, bool) or not max_gb > 0:
            raise ConfigError(f"cache_max_gb must be a positive number of gigabytes, got {max_gb!r} "
                              "(cache=false turns the cache off)")  # fmt: skip
        return cls(FeatureStore(root, int(max_gb * 1e9)))

    def __deepcopy__(self, memo: dict) -> "FeatureCache":
        return self

    def counts(self) -> dict[str, int]:
        return {"images_read": self.read, "images_computed": self.computed}

    def features(self, network: FrozenNetwork, images: Tensor) -> dict[str, Tensor]:
        """``network.compute(images)`` ``{layer: [B, C, h, w]}``, read from the cache when every image of
        the batch is there, else computed and the missing images stored."""
        if images.requires_grad:  # a gradient through the input (never in the methods): no cache
            return network.compute(images)
        self._lookups += 1
        lookups = self._lookups
        fingerprint = self._fingerprint(network, images.device.type)
        keys = [image_key(fingerprint, image) for image in images]
        cached = self._read_all(network, keys, tuple(images.shape[-2:]))
        if cached is not None:
            self.read += len(keys)
            return {layer: tensor.to(images.device) for layer, tensor in cached.items()}
        features = network.compute(images)
        if self._lookups == lookups:  # no network inside it went through the cache
            self.computed += len(keys)
        self._store(keys, features)
        return features

    def _fingerprint(self, network: FrozenNetwork, device_type: str) -> str:
        """Computed once per network and device type (hashing WideResNet50's weights takes ~0.5 s); a
        frozen network's weights do not change after its first use."""
        known = self._fingerprints.setdefault(network, {})
        if device_type not in known:
            known[device_type] = network_fingerprint(network, device_type)
        return known[device_type]

    def _read_all(
        self, network: FrozenNetwork, keys: list[str], size: tuple[int, int]
    ) -> dict[str, Tensor] | None:
        """The batch's features from the cache, in the layout they were computed in; None at the first
        image that is missing or damaged (the whole batch is then computed)."""
        per_image, channels_last = [], set()
        for key in keys:
            entry = self.store.read(key)
            if entry is None:
                return None
            tensors, metadata = entry
            if not set(network.layers) <= set(tensors):  # another network's layers: computed, rewritten
                return None
            if problem := _problem(tensors, network.output_shapes(size)):
                self.store.discard(key, problem)
                return None
            per_image.append(tensors)
            channels_last = set(filter(None, metadata.get(CHANNELS_LAST, "").split(",")))
        batch = {}
        for layer in network.layers:
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
            if all(_finite(tensor) for tensor in tensors.values()):
                self.store.write(key, tensors, {CHANNELS_LAST: layout})


def _read_count(descriptor: int) -> int | None:
    """The shared count of bytes in the open count file; None when it is new or damaged."""
    try:
        return int(os.pread(descriptor, SIZE_DIGITS + 1, 0))
    except ValueError:
        return None


def _problem(tensors: dict[str, Tensor], shapes: dict[str, torch.Size]) -> str | None:
    """What is wrong with a cache file's tensors, given the network's ``{layer: [C, h, w]}`` at this input
    size; None if nothing."""
    for layer, shape in shapes.items():
        tensor = tensors[layer]
        if tensor.dtype != torch.float32 or tensor.shape != shape:
            return f"of the wrong shape or type ({layer}: {tensor.dtype} {list(tensor.shape)})"
        if not _finite(tensor):
            return f"non-finite ({layer} holds NaN or infinity)"
    return None


def _finite(tensor: Tensor) -> bool:
    """Whether every value is finite, from the float64 sum: a NaN or an infinity anywhere makes it
    non-finite, float32 values cannot overflow it, and it costs a fraction of an element-wise test."""
    return bool(torch.isfinite(tensor.sum(dtype=torch.float64)))


def use_cache(model: nn.Module, cache: FeatureCache | None) -> None:
    """Every frozen network of ``model`` reads and writes ``cache`` (None: none)."""
    for module in model.modules():
        if isinstance(module, FrozenNetwork):
            module.cache = cache
