"""The feature cache: its key, bit-identical reads, damaged files, unwritable disks and eviction (across
processes too)."""

import logging
import multiprocessing
import os
import threading
from pathlib import Path
from unittest import mock

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision import tv_tensors

import anomaly
from anomaly.backbones import FeatureExtractor, PatchFeatures
from anomaly.backbones.feature_cache import (
    FeatureCache,
    FeatureStore,
    image_key,
    network_fingerprint,
    use_cache,
)
from anomaly.backbones.geometry import GridGeometry, probe_geometry
from anomaly.cli.cache import main as cache_main
from anomaly.data.decode import read_image
from anomaly.data.preprocessing import Preprocessing
from anomaly.errors import ConfigError
from anomaly.experiment import resources_of
from anomaly.methods.efficientad.model import Teacher

LAYERS = ["layer1", "layer2"]


def resnet18(layers=LAYERS, fold_batch_norms=True) -> FeatureExtractor:
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="randomly initialised"):
        return FeatureExtractor("resnet18", layers, weights=None, fold_batch_norms=fold_batch_norms)


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return resnet18()


def images(count: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def cached(extractor: FeatureExtractor, root: Path, max_bytes: int = 10**9) -> FeatureCache:
    cache = FeatureCache(FeatureStore(root, max_bytes))
    use_cache(extractor, cache)
    return cache


def assert_identical(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for layer in a:
        assert torch.equal(a[layer], b[layer]), layer
        assert a[layer].stride() == b[layer].stride(), layer  # the same layout: the same rounding after it


def test_cold_and_warm_batches_give_the_uncached_features_bit_for_bit(extractor, tmp_path):
    batch = images()
    with torch.no_grad():
        uncached = extractor.compute(batch)
        cache = cached(extractor, tmp_path)
        try:
            cold, warm = extractor(batch), extractor(batch)
        finally:
            use_cache(extractor, None)
    assert (cache.read, cache.computed) == (3, 3)
    assert_identical(cold, uncached)
    assert_identical(warm, uncached)
    assert len(cache.store.files()) == 3


def patch_features(backbone: FeatureExtractor, **sizes) -> PatchFeatures:
    dims = {"pre_embed_dim": 48, "target_embed_dim": 32} | sizes
    return PatchFeatures(backbone, cache_output=True, **dims)


def test_patch_features_with_cache_output_are_read_whole_and_equal_the_uncached_bit_for_bit(tmp_path):
    """SimpleNet's features: a warm read runs neither the backbone nor the aggregation; each image is
    counted once (read, or computed by the backbone); the key follows the aggregation's sizes and layers."""
    features, batch = patch_features(resnet18()), images()
    with torch.no_grad():
        uncached = features(batch)
        cache = cached(features, tmp_path)
        cold = features(batch)
        files = len(cache.store.files())
        aggregation = "anomaly.backbones.patch_features.aggregate_patch_features"
        with mock.patch(aggregation, side_effect=AssertionError):
            warm = features(batch)
    assert (cache.read, cache.computed, files) == (3, 3, 6)  # the backbone's maps and the features per image
    for output in (cold, warm):
        assert output.is_contiguous() and torch.equal(output, uncached)
    other_sizes = patch_features(features.backbone, target_embed_dim=16)  # its own key, the same backbone
    use_cache(other_sizes, cache)
    with torch.no_grad():
        other_sizes(batch)
    assert (cache.read, cache.computed) == (6, 3)  # aggregated anew from the maps read: counted as read
    backbone_only = PatchFeatures(resnet18(), pre_embed_dim=48, target_embed_dim=32)  # cache_output=False
    use_cache(backbone_only, FeatureCache(FeatureStore(tmp_path / "other", 10**9)))
    with torch.no_grad():
        assert torch.equal(backbone_only(batch), uncached)
    assert len(backbone_only.cache.store.files()) == 3
    key = image_key(network_fingerprint(features, "cpu"), batch[0])
    others = [{"target_embed_dim": 16}, {"pre_embed_dim": 40}, {"patch_size": 1}]
    for other in [patch_features(resnet18(["layer2"])), *(patch_features(resnet18(), **o) for o in others)]:
        assert image_key(network_fingerprint(other, "cpu"), batch[0]) != key


def test_a_batch_with_one_new_image_is_computed_whole_and_stores_only_the_new_one(extractor, tmp_path):
    with torch.no_grad():
        cache = cached(extractor, tmp_path)
        try:
            extractor(images(2))
            mixed = torch.cat([images(2), images(1, seed=9)])
            features = extractor(mixed)
        finally:
            use_cache(extractor, None)
        assert_identical(features, extractor.compute(mixed))
    assert (cache.read, cache.computed) == (0, 5)
    assert len(cache.store.files()) == 3


def test_the_key_covers_image_bytes_preprocessing_graph_weights_and_precision(extractor):
    fingerprint = network_fingerprint(extractor, "cpu")
    image = images(1)[0]
    key = image_key(fingerprint, image)
    changed_pixel = image.clone()
    changed_pixel[0, 0, 0] += 1e-3
    assert image_key(fingerprint, changed_pixel) != key
    assert image_key(fingerprint, image[:, :32]) != key  # another size or crop is another tensor
    assert image_key(network_fingerprint(extractor, "cuda"), image) != key
    assert image_key(network_fingerprint(resnet18(["layer1"]), "cpu"), image) != key
    assert image_key(network_fingerprint(resnet18(fold_batch_norms=False), "cpu"), image) != key
    heavier = resnet18()
    heavier.body.conv1.weight.data[0, 0, 0, 0] += 1e-3
    assert image_key(network_fingerprint(heavier, "cpu"), image) != key
    bfloat16 = resnet18()
    bfloat16.set_precision("bfloat16")
    assert image_key(network_fingerprint(bfloat16, "cpu"), image) != key
    assert network_fingerprint(resnet18(), "cpu") == fingerprint  # the same weights rebuilt: the same key


def test_the_key_ignores_the_file_path_and_time_but_not_its_content(extractor, tmp_path):
    pixels = (images(1)[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy()
    first, second, other = tmp_path / "a.png", tmp_path / "sub" / "b.png", tmp_path / "c.png"
    second.parent.mkdir()
    Image.fromarray(pixels).save(first)
    Image.fromarray(pixels).save(second)
    os.utime(second, (1_000_000, 1_000_000))
    pixels[:8, :8] //= 2  # a darker corner
    Image.fromarray(pixels).save(other)
    fingerprint = network_fingerprint(extractor, "cpu")

    def key(path: Path, size: int = 48) -> str:  # as the data set reads and preprocesses an image
        return image_key(fingerprint, Preprocessing(size).transform()(tv_tensors.Image(read_image(path))))

    assert key(first) == key(second) != key(other)
    assert key(first, size=40) != key(first)


def test_a_file_with_more_layers_serves_fewer_and_one_with_fewer_is_recomputed(tmp_path, caplog):
    """PaDiM's layer1-3 and PatchCore's layer2+3 of one graph (up to layer3): one backbone pass for both."""
    three, two = resnet18(["layer1", "layer2", "layer3"]), resnet18(["layer2", "layer3"])
    batch = images(2)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="anomaly.backbones.feature_cache"):
        cache = cached(two, tmp_path)
        use_cache(three, cache)
        two(batch)  # stores layer2+3
        from_three = three(batch)  # lacks layer1: computed, rewritten with all three
        from_two = two(batch)  # served by the three-layer files
        three(batch)
    assert (cache.read, cache.computed) == (4, 4) and caplog.text == ""
    assert_identical(from_three, three.compute(batch))
    assert_identical(from_two, two.compute(batch))
    stored = [cache.store.layers(path.stem) for path, _ in cache.store.files()]
    assert stored == [{"layer1", "layer2", "layer3"}] * 2  # rewritten with all three


def damage(path: Path, how: str, layers: list[str]) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif how == "not safetensors":
        path.write_bytes(b"\x00" * 64)
    elif how == "wrong shape":
        save_file({layer: torch.zeros(5, 2, 2) for layer in layers}, path)
    elif how == "non-finite":
        tensors = {layer: torch.full((64, 16, 16), float("nan")) for layer in layers}
        tensors["layer2"] = torch.zeros(128, 8, 8)
        save_file(tensors, path)


@pytest.mark.parametrize("how", ["truncated", "not safetensors", "wrong shape", "non-finite"])
def test_a_damaged_cache_file_is_named_deleted_and_recomputed(extractor, tmp_path, caplog, how):
    batch = images(2)
    with torch.no_grad():
        cache = cached(extractor, tmp_path)
        try:
            extractor(batch)
            victim = sorted(path for path, _ in cache.store.files())[0]
            damage(victim, how, LAYERS)
            with caplog.at_level(logging.WARNING, logger="anomaly.backbones.feature_cache"):
                features = extractor(batch)
            repaired = extractor(batch)
        finally:
            use_cache(extractor, None)
        uncached = extractor.compute(batch)
    assert str(victim) in caplog.text and "recomputed" in caplog.text
    assert (cache.read, cache.computed) == (2, 4)  # the damaged read recomputed the batch, then rewrote it
    assert_identical(features, uncached)
    assert_identical(repaired, uncached)


def test_an_unwritable_cache_warns_once_and_changes_nothing(extractor, tmp_path, caplog):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="anomaly.backbones.feature_cache"):
        cache = cached(extractor, not_a_folder)
        try:
            first, second = extractor(images(2)), extractor(images(2))
        finally:
            use_cache(extractor, None)
        assert_identical(first, extractor.compute(images(2)))
        assert_identical(second, first)
    assert caplog.text.count("cannot write") == 1 and str(not_a_folder) in caplog.text
    assert (cache.read, cache.computed) == (0, 4)


def test_the_size_cap_evicts_the_least_recently_read_files(tmp_path):
    tensors = {"x": torch.zeros(256)}
    store = FeatureStore(tmp_path, max_bytes=10**9)
    store.write("aa01", tensors, {})
    size = store.size()
    store = FeatureStore(tmp_path, max_bytes=int(2.5 * size))  # two files fit, three do not
    store.write("bb02", tensors, {})
    for age, key in enumerate(("aa01", "bb02")):
        os.utime(store.path(key), ns=(10**18 + age, 10**18 + age))  # bb02 newer than aa01 ...
    assert store.read("aa01") is not None  # ... until aa01 is read
    store.write("cc03", tensors, {})
    assert {path.stem for path, _ in store.files()} == {"aa01", "cc03"}
    assert store.clear() == 2 * size and store.files() == []


def test_concurrent_writers_of_one_key_never_show_a_reader_a_partial_file(tmp_path, caplog):
    store = FeatureStore(tmp_path, max_bytes=10**9)
    tensors = {"x": torch.arange(200_000, dtype=torch.float32)}
    stop = threading.Event()

    def write() -> None:
        while not stop.is_set():
            store.write("ab", tensors, {})

    writers = [threading.Thread(target=write) for _ in range(2)]
    with caplog.at_level(logging.WARNING, logger="anomaly.backbones.feature_cache"):
        for writer in writers:
            writer.start()
        reads = []
        while len(reads) < 50:
            if (entry := store.read("ab")) is not None:
                reads.append(entry[0]["x"])
        stop.set()
        for writer in writers:
            writer.join()
    assert caplog.text == ""  # nothing found damaged
    assert all(torch.equal(x, tensors["x"]) for x in reads)
    assert [path.name for path in tmp_path.glob("*/*")] == ["ab.safetensors"]  # no temporary file left


def test_anomaly_cache_shows_the_size_and_clears(extractor, tmp_path, capsys):
    with torch.no_grad():
        cached(extractor, tmp_path / "cache")
        try:
            extractor(images(2))
        finally:
            use_cache(extractor, None)
    cache_main(["info", str(tmp_path / "cache")])
    assert "2 images' features" in capsys.readouterr().out
    cache_main(["clear", str(tmp_path / "cache")])
    cache_main(["info", str(tmp_path / "cache")])
    assert "0 images' features" in capsys.readouterr().out
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit):
        cache_main(["info", str(tmp_path / "a_file")])
    assert "is a file" in capsys.readouterr().err


def test_a_bad_size_cap_is_a_config_error_and_cache_false_is_no_cache(tmp_path):
    with pytest.raises(ConfigError, match="cache_max_gb"):
        resources_of(anomaly.compose(["cache_max_gb=0"], output_dir=tmp_path))
    assert resources_of(anomaly.compose(["cache=false"], output_dir=tmp_path)).feature_cache is None
    cache = resources_of(anomaly.compose(["cache_max_gb=0.5"], output_dir=tmp_path)).feature_cache
    assert cache.store.max_bytes == 500_000_000 and cache.store.root.name == "feature_cache"


def test_the_grid_geometry_of_a_cached_backbone_is_probed_on_its_convolutions(tmp_path):
    """Where a grid's cells lie is read off the convolutions a forward pass runs: a warm cache, which runs
    none, must not be what the probe calls (a second run failed: "cannot tell where the cells ... lie")."""
    extractor = resnet18()
    expected = probe_geometry(extractor, (64, 64))
    cache = cached(extractor, tmp_path)
    extractor(torch.zeros(1, 3, 64, 64))  # the probe's own zero image, now in the cache
    assert GridGeometry()(extractor, (64, 64)) == expected
    assert (cache.read, cache.computed) == (0, 1)  # the geometry ran the network, never the cache


def teacher(seed: int = 0) -> Teacher:
    torch.manual_seed(seed)
    return Teacher(out_channels=8, model_size="small")


def test_the_efficientad_teacher_is_cached_under_its_own_weights(tmp_path):
    """Its outputs on a batch: cold and warm equal to its computation; another teacher's weights are
    another key, so a teacher never reads another's outputs."""
    batch = images(2)
    cache = cached(teacher(), tmp_path)
    first, other = teacher(), teacher(seed=1)
    use_cache(first, cache)
    use_cache(other, cache)
    cold, warm = first(batch), first(batch)
    assert_identical(cold, first.compute(batch))
    assert_identical(warm, cold)
    assert_identical(other(batch), other.compute(batch))
    assert (cache.read, cache.computed) == (2, 4)  # the other teacher computed its own
    assert network_fingerprint(first, "cpu") == network_fingerprint(teacher(), "cpu")
    assert network_fingerprint(first, "cpu") != network_fingerprint(other, "cpu")
    assert cold["output"].shape[1:] == first.output_shapes((64, 64))["output"] == (8, 8, 8)


FILE_BYTES = 4096  # one test file's tensor


def fill(
    root: Path, name: str, count: int, max_bytes: int, started: "multiprocessing.synchronize.Barrier"
) -> None:
    """Writes ``count`` files of ``FILE_BYTES`` into the cache at ``root``, the first before the barrier."""
    store = FeatureStore(root, max_bytes)
    for index in range(count):
        store.write(f"{name}{index:04d}", {"x": torch.zeros(FILE_BYTES // 4)}, {})
        if index == 0:
            started.wait(timeout=60)


def test_the_size_cap_holds_for_processes_writing_one_cache_together(tmp_path):
    """Two processes, each writing 0.7 of the cap after both began: together 1.4 caps. Each counted only its
    own writes before (each stayed under the cap and nothing was evicted: 1.4 caps on disk); the count
    they share keeps the folder at most at the cap."""
    probe = FeatureStore(tmp_path / "probe", 10**9)
    probe.write("aa", {"x": torch.zeros(FILE_BYTES // 4)}, {})
    file_size = probe.size()
    max_bytes, count = 40 * file_size, 28
    context = multiprocessing.get_context("fork")
    started = context.Barrier(2)
    writers = [context.Process(target=fill, args=(tmp_path / "cache", name, count, max_bytes, started))
               for name in ("aa", "bb")]  # fmt: skip
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
    assert [writer.exitcode for writer in writers] == [0, 0]
    store = FeatureStore(tmp_path / "cache", max_bytes)
    assert 0.5 * max_bytes < store.size() <= max_bytes  # evicted to the cap, not emptied
    assert int((tmp_path / "cache" / ".size").read_text()) == store.size()  # the shared count is exact
