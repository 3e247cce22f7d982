"""PatchCore beyond RAM and beyond one process: patches spilled to a file during collection, and the coreset
selected on several processes (gloo, spawned here, no Lightning), each the selection of one process in
memory, index for index."""

import datetime
import json
import os
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from anomaly.backbones import FeatureExtractor
from anomaly.backbones.patch_features import PatchFeatures
from anomaly.data.preprocessing import Preprocessing
from anomaly.distributed import ProcessGroupCollective
from anomaly.errors import ConfigError
from anomaly.methods.patchcore.coreset import ApproximateGreedyCoreset
from anomaly.methods.patchcore.model import PatchCore
from anomaly.methods.patchcore.reproducible import (
    dot_rows,
    empty_for_gemv,
    in_gemv_layout,
    project,
    projection_matrix,
)
from anomaly.methods.patchcore.spill import PatchSpill
from anomaly.model_io import load_model, save_model

RANKS = 3
# name: (points, feature dim, projection dim, coreset dtype, rows per rank); a rank may hold no row
SELECTIONS = {
    "uneven float32": (1501, 256, 32, torch.float32, (600, 0, 901)),
    "uneven float16": (1501, 256, 32, torch.float16, (1, 800, 700)),
    "duplicates float32": (1200, 48, 16, torch.float32, (403, 450, 347)),
    "duplicates float16": (1200, 48, 16, torch.float16, (403, 450, 347)),
    "wide float16": (1000, 1024, 128, torch.float16, (499, 2, 499)),
}
# name: (coreset dtype, coreset ratio, training images per rank), of 8 images
FITS = {"float16": ("float16", 0.25, (3, 0, 5)), "float32": ("float32", 0.25, (4, 3, 1)),
        "keep all": ("float32", 1.0, (2, 4, 2))}  # fmt: skip


def features_of(name: str) -> Tensor:
    """The features ``[N, D]`` of a case of :data:`SELECTIONS`, the same in every process: "duplicates"
    repeats N / 6 points 6 times in a shuffled order, so that ties span ranks."""
    num_points, dim = SELECTIONS[name][:2]
    generator = torch.Generator().manual_seed(len(name))
    if name.startswith("duplicates"):
        distinct = torch.randn(num_points // 6, dim, generator=generator)
        return distinct.repeat(6, 1)[torch.randperm(num_points, generator=generator)]
    return torch.randn(num_points, dim, generator=generator).relu_()  # non-negative, as backbone features


def sampler_of(name: str) -> ApproximateGreedyCoreset:
    _, _, projection_dim, dtype, _ = SELECTIONS[name]
    return ApproximateGreedyCoreset(0.1, projection_dim, num_starting_points=10, dtype=dtype, seed=7)


def patchcore(backbone: type, dtype: str = "float32", ratio: float = 0.25, **options) -> PatchCore:
    features = PatchFeatures(backbone(layers=("stage2", "stage3")), pre_embed_dim=48, target_embed_dim=48)
    return PatchCore(features, coreset_ratio=ratio, coreset_dtype=dtype, **{"projection_dim": 16, **options})


def block_of(items: Tensor, sizes: tuple[int, ...], rank: int) -> Tensor:
    start = sum(sizes[:rank])
    return items[start : start + sizes[rank]]


def batches_of(images: Tensor, sizes: tuple[int, ...], rank: int) -> tuple[Tensor, ...]:
    """Rank ``rank``'s training batches of 3 images; none for a rank without images."""
    block = block_of(images, sizes, rank)
    return block.split(3) if len(block) else ()


# --- one process -------------------------------------------------------------------------------------


def test_the_spill_gives_back_its_rows(tmp_path: Path) -> None:
    rows = torch.randn(1000, 24, generator=torch.Generator().manual_seed(0))
    with PatchSpill(str(tmp_path)) as spill:
        for batch in rows.split(333):
            spill.append(batch)
        assert not list(tmp_path.iterdir())  # the file has no name
        assert os.readlink(f"/proc/self/fd/{spill._file.fileno()}").startswith(str(tmp_path))
        assert torch.equal(torch.cat(list(spill.blocks(128))), rows)
        indices = torch.randperm(1000, generator=torch.Generator().manual_seed(1))[:77]
        assert torch.equal(spill.take(indices), rows[indices])
        torch.testing.assert_close(spill.feature_sum(), rows.double().sum(dim=0), rtol=1e-12, atol=1e-12)
        with pytest.raises(IndexError, match=r"\[0, 1000\)"):
            spill.take(torch.tensor([1000]))
        file = spill._file
    assert file.closed and not len(spill)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_row_rounds_alike_in_any_block(dtype: torch.dtype) -> None:
    """What lets pruning and sharding leave the selection alone: a point's distance and projection are the
    same bits in a whole set, a rank's block or a gather of candidates, with 1 or 2 threads."""
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(3000, 1024, generator=generator).relu_()
    matrix = projection_matrix(1024, 128, generator, torch.device("cpu"))
    mean = features.mean(dim=0)
    whole = project(features, matrix, mean, dtype)
    threads = torch.get_num_threads()
    try:
        for block_threads in (1, 2):
            torch.set_num_threads(block_threads)
            for start, stop in [(0, 1001), (1001, 3000), (5, 6), (17, 2099)]:
                assert torch.equal(project(features[start:stop], matrix, mean, dtype), whole[start:stop])
    finally:
        torch.set_num_threads(threads)
    center = whole[10]
    distances = dot_rows(whole, center, whole.new_empty(3000))
    for start, stop in [(0, 1001), (1001, 3000), (2990, 2991)]:
        block = in_gemv_layout(whole[start:stop].clone())
        assert torch.equal(dot_rows(block, center, block.new_empty(len(block))), distances[start:stop])
    candidates = torch.randperm(3000, generator=generator)[:333]
    gathered = in_gemv_layout(whole.index_select(0, candidates))
    assert torch.equal(dot_rows(gathered, center, gathered.new_empty(333)), distances[candidates])
    assert whole.stride() == empty_for_gemv(3000, 128, dtype, torch.device("cpu")).stride()


@pytest.mark.parametrize(("dtype", "projection_dim"), [("float32", 16), ("float16", 16), ("float16", 128)])
def test_fit_from_the_spill_selects_what_select_selects_in_memory(
    dtype: str, projection_dim: int, tiny_backbone, smooth_images, tmp_path: Path
) -> None:
    """The old way as the reference: every patch in memory, torch.cat, select (128 >= D: not projected)."""
    model = patchcore(tiny_backbone, dtype, projection_dim=projection_dim)
    model.spill_dir = str(tmp_path)
    batches = smooth_images(12, seed=2).split(5)
    for batch in batches:
        model.collect(batch)
    model.fit()
    features = torch.cat([model.embed(batch).flatten(0, 1) for batch in batches])  # [N, D]
    expected = model.sampler.select(features)
    assert torch.equal(model.memory_bank, features[expected])  # row for row, in selection order
    assert not list(tmp_path.iterdir()) and model._spill is None


def test_collect_keeps_no_full_width_patch(tiny_backbone, smooth_images, monkeypatch) -> None:
    model = patchcore(tiny_backbone)
    embed, kept = model.embed, []

    def watched_embed(images: Tensor) -> Tensor:
        patches = embed(images)
        kept.append(weakref.ref(patches))
        return patches

    monkeypatch.setattr(model, "embed", watched_embed)
    for batch in smooth_images(6, seed=3).split(2):
        model.collect(batch)
    assert len(kept) == 3 and all(ref() is None for ref in kept)
    model.fit()


def test_the_spill_file_is_closed_after_a_failed_fit(tiny_backbone, smooth_images, monkeypatch) -> None:
    model = patchcore(tiny_backbone)
    model.collect(smooth_images(2, seed=4))
    spill_file = model._spill._file

    def failing_select(features, collective) -> Tensor:
        raise MemoryError("no room for the coreset")

    monkeypatch.setattr(model.sampler, "select", failing_select)
    with pytest.raises(MemoryError):
        model.fit()
    assert spill_file.closed and model._spill is None
    with pytest.raises(RuntimeError, match="needs features"):  # nothing left over from the failed fit
        model.fit()


@pytest.mark.filterwarnings("ignore:backbone resnet18 is randomly initialised")
def test_a_model_file_loads_without_its_spill_dir(tmp_path: Path) -> None:
    """The spill folder is where one machine has room (paths.spill_dir), never in the file; a file that an
    older version wrote with ``spill_dir`` in its model config loads, without it."""
    backbone = {"name": "resnet18", "layers": ["layer1", "layer2"], "weights": None}
    features = {"backbone": backbone, "pre_embed_dim": 32, "target_embed_dim": 32}
    spill_dir = tmp_path / "scratch"  # exists on the training machine only
    spill_dir.mkdir()
    model = PatchCore(PatchFeatures(FeatureExtractor(**backbone), pre_embed_dim=32, target_embed_dim=32),
                      coreset_ratio=0.5)  # fmt: skip
    model.spill_dir = str(spill_dir)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model.collect(images)
    model.fit()
    config = {"features": features, "coreset_ratio": 0.5}
    with pytest.raises(ConfigError, match="'spill_dir' is not a parameter of PatchCore"):
        save_model(model, "patchcore", {**config, "spill_dir": str(spill_dir)}, Preprocessing([64, 64], None),
                   tmp_path / "model.safetensors")  # fmt: skip
    save_model(model, "patchcore", config, Preprocessing([64, 64], None), tmp_path / "model.safetensors")
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    old_config = {**json.loads(metadata["model"]), "spill_dir": str(spill_dir)}  # as older versions wrote it
    metadata["model"] = json.dumps(old_config)
    save_file(load_file(str(tmp_path / "model.safetensors")), str(tmp_path / "model.safetensors"), metadata)
    spill_dir.rmdir()

    loaded = load_model(tmp_path)
    assert loaded.model.spill_dir is None and "spill_dir" not in loaded.config
    assert torch.equal(loaded.model(images).anomaly_map, model.eval()(images).anomaly_map)
    loaded.model.update([images])  # a spill in the system temp dir
    assert len(loaded.model.memory_bank) == len(model.memory_bank) * 2


# --- several processes -------------------------------------------------------------------------------


def run_rank(rank: int, rendezvous: str, out_dir: str, backbone: type, images: Tensor) -> None:
    """One of :data:`RANKS` processes: every case of :data:`SELECTIONS` and :data:`FITS` on its block."""
    torch.set_num_threads(1)  # 3 processes on 2 cores; one process runs with 2 threads
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=RANKS,
                            timeout=datetime.timedelta(seconds=120))  # fmt: skip
    collective = ProcessGroupCollective()
    try:
        results = {}
        for name, (*_, sizes) in SELECTIONS.items():
            results[name] = sampler_of(name).select(block_of(features_of(name), sizes, rank), collective)
        for name, (dtype, ratio, sizes) in FITS.items():
            model = patchcore(backbone, dtype, ratio)
            for batch in batches_of(images, sizes, rank):
                model.collect(batch)
            model.fit(collective)
            results[name] = model.memory_bank
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks_results(tmp_path_factory, tiny_backbone, smooth_images) -> list[dict[str, Tensor]]:
    """What every rank of a spawned 3-process gloo group selected and fitted."""
    out_dir = tmp_path_factory.mktemp("ranks")
    rendezvous = f"file://{out_dir / 'rendezvous'}"
    mp.spawn(run_rank, args=(rendezvous, str(out_dir), tiny_backbone, smooth_images(8, seed=5)), nprocs=RANKS)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(RANKS)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SELECTIONS))
def test_several_processes_select_what_one_selects(name: str, ranks_results) -> None:
    expected = sampler_of(name).select(features_of(name))  # one process, in memory, 2 threads
    for results in ranks_results:
        assert torch.equal(results[name], expected), name


@pytest.mark.parametrize("name", list(FITS))
def test_several_processes_fit_the_bank_one_fits(
    name: str, ranks_results, tiny_backbone, smooth_images
) -> None:
    """The one process collects the ranks' batches: a backbone's features round by the batch they come in
    (TinyBackbone: 1.5e-8 between batches of 3 and 4), which is not PatchCore's doing."""
    dtype, ratio, sizes = FITS[name]
    model = patchcore(tiny_backbone, dtype, ratio)
    images = smooth_images(8, seed=5)
    for rank in range(RANKS):
        for batch in batches_of(images, sizes, rank):
            model.collect(batch)
    model.fit()
    for results in ranks_results:  # every rank holds the whole bank, the one of one process
        assert torch.equal(results[name], model.memory_bank), name
