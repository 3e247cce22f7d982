"""PatchCore: coreset against brute force, k-NN backends, feature aggregation order, end to end.

The backbone is a tiny random stand-in with the FeatureExtractor interface, so that these tests depend
neither on pretrained weights nor on the real backbone module.
"""

import copy
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from anomaly.backbones.patch_features import PatchFeatures
from anomaly.methods.patchcore import nearest_neighbors
from anomaly.methods.patchcore.coreset import (
    ApproximateGreedyCoreset,
    KeepAll,
    TrianglePruning,
    coreset_sampler,
    greedy_k_center,
    random_projection,
)
from anomaly.methods.patchcore.model import PatchCore
from anomaly.methods.patchcore.nearest_neighbors import nearest_distances
from anomaly.methods.patchcore.reproducible import single_cpu_thread


@pytest.fixture(scope="module")
def make_model(tiny_backbone):
    """``make_model(**options)``: PatchCore on the tiny backbone's stride-8 and stride-16 stages."""

    def make(**kwargs) -> PatchCore:
        dims = {key: kwargs.pop(key, 64) for key in ("pre_embed_dim", "target_embed_dim")}
        features = PatchFeatures(tiny_backbone(layers=("stage2", "stage3")), **dims)
        return PatchCore(features, **{"coreset_ratio": 0.25, "blur_sigma": 2.0, **kwargs})

    return make


@pytest.fixture(scope="module")
def fitted_model(make_model, smooth_images):
    def fit(**kwargs) -> PatchCore:
        model = make_model(**kwargs)
        for batch in smooth_images(16, seed=0).split(8):
            model.collect(batch)
        model.fit()
        return model

    return fit


@pytest.fixture(scope="module")
def model(fitted_model) -> PatchCore:
    return fitted_model()


# --- coreset -----------------------------------------------------------------------------------------


def brute_force_greedy(points: np.ndarray, count: int, starts: np.ndarray) -> list[int]:
    """Greedy k-center from the full float64 distance matrix, starting from mean distances to ``starts``."""
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
    min_dist = distances[:, starts].mean(axis=1)
    selected = []
    for _ in range(count):
        index = int(np.argmax(min_dist))
        selected.append(index)
        min_dist = np.minimum(min_dist, distances[:, index])
    return selected


def test_coreset_matches_brute_force_greedy() -> None:
    features = torch.randn(300, 40, generator=torch.Generator().manual_seed(1))
    sampler = ApproximateGreedyCoreset(0.1, projection_dim=16, num_starting_points=10, seed=3)
    # select() draws the projection, then the starting points, from Generator(seed): replay that here
    generator = torch.Generator().manual_seed(3)
    points = random_projection(features, 16, generator, torch.float32)
    starts = torch.randperm(300, generator=generator)[:10]

    expected = brute_force_greedy(points.double().numpy(), 30, starts.numpy())
    assert sampler.select(features).tolist() == expected


def coverage_radius(points: Tensor, selected: Tensor) -> float:
    """Largest distance of any point to its nearest selected point (float64)."""
    points = points.double()
    return torch.cdist(points, points[selected]).amin(dim=1).max().item()


def test_float16_coreset_covers_as_well_as_float32() -> None:
    features = torch.randn(3000, 64, generator=torch.Generator().manual_seed(2)) + 3.0
    points = random_projection(features, 32, torch.Generator().manual_seed(0), torch.float32)
    starts = torch.arange(10)
    radius32 = coverage_radius(points, greedy_k_center(points, 150, starts))
    radius16 = coverage_radius(points, greedy_k_center(points.half(), 150, starts))
    print(f"coverage radius float32 {radius32:.4f}, float16 {radius16:.4f} ({radius16 / radius32 - 1:+.2%})")
    assert radius16 <= 1.03 * radius32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triangle_pruning_selects_what_full_passes_select(dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(4)
    clusters = torch.randn(30, 32, generator=generator) * 4
    features = clusters[torch.randint(0, 30, (4000,), generator=generator)] + torch.randn(
        4000, 32, generator=generator
    )
    points = random_projection(features, 16, torch.Generator().manual_seed(0), dtype)
    starts = torch.arange(10)
    candidate_counts = []
    find_candidates = TrianglePruning.candidates

    def counting_candidates(self):
        candidates = find_candidates(self)
        candidate_counts.append(len(points) if candidates is None else len(candidates))
        return candidates

    monkeypatch.setattr(TrianglePruning, "candidates", counting_candidates)
    pruned = greedy_k_center(points, 400, starts)
    pruned_steps = [
        count for count in candidate_counts if count < TrianglePruning.FULL_PASS_FRACTION * len(points)
    ]
    assert len(pruned_steps) >= 3  # the pruned path ran: steps that skipped more than 3/4 of the points
    monkeypatch.setattr(TrianglePruning, "FULL_PASS_FRACTION", -1.0)  # every step a full pass
    assert torch.equal(pruned, greedy_k_center(points, 400, starts))


@pytest.mark.parametrize(
    ("num_points", "ratio", "expected"), [(1000, 0.1, 100), (10, 0.333, 3), (50, 0.001, 1)]
)
def test_coreset_size_is_int_of_n_times_ratio(num_points: int, ratio: float, expected: int) -> None:
    selected = ApproximateGreedyCoreset(ratio, projection_dim=4).select(torch.randn(num_points, 8))
    assert len(selected) == expected
    assert len(set(selected.tolist())) == expected


def test_coreset_ratio_one_keeps_everything_in_order() -> None:
    sampler = coreset_sampler(1.0)
    assert isinstance(sampler, KeepAll)  # one identity sampler: nothing projected or selected
    assert sampler.select(torch.randn(37, 8)).tolist() == list(range(37))
    assert sampler.extend(torch.randn(5, 8), torch.randn(9, 8)).tolist() == list(range(9))
    for ratio in (0.0, 1.5, 2):  # a ratio above 1 was once silently taken as 1
        with pytest.raises(ValueError, match="coreset_ratio"):
            coreset_sampler(ratio)
    with pytest.raises(ValueError, match="coreset_ratio"):  # the greedy sampler never keeps everything
        ApproximateGreedyCoreset(1.0)


# --- nearest neighbours ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["faiss", "torch", "auto"])
def test_knn_backends_match_brute_force(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nearest_neighbors, "_CHUNK_BYTES", 4 * 200 * 7)  # torch: 7 query rows per chunk
    generator = torch.Generator().manual_seed(4)
    queries, bank = torch.randn(50, 24, generator=generator), torch.randn(200, 24, generator=generator)
    expected_dist, expected_index = torch.cdist(queries.double(), bank.double()).topk(3, largest=False)

    distances, indices = nearest_distances(queries, bank, k=3, backend=backend)
    assert torch.equal(indices, expected_index)
    torch.testing.assert_close(distances.double(), expected_dist, rtol=1e-5, atol=1e-5)


def test_embed_shape(make_model, smooth_images) -> None:
    embedding = make_model(pre_embed_dim=50, target_embed_dim=40).embed(smooth_images(2, seed=9))
    assert embedding.shape == (2, 8 * 8, 40)


# --- end to end --------------------------------------------------------------------------------------


def test_square_defect_scores_higher_and_is_localised(
    model: PatchCore, smooth_images, with_square, defect_square
) -> None:
    assert model.memory_bank.shape == (int(16 * 64 * 0.25), 64)
    normal = smooth_images(4, seed=1)
    normal_out, defect_out = model(normal), model(with_square(normal[:1]))

    image_size = normal.shape[-1]
    assert defect_out.anomaly_map.shape == (1, 1, image_size, image_size)
    assert defect_out.image_score.shape == (1,)
    assert defect_out.image_score.item() > normal_out.image_score.max().item()
    peak_row, peak_col = divmod(defect_out.anomaly_map.flatten().argmax().item(), image_size)
    margin = 4  # half a cell of the stride-8 patch grid
    assert defect_square[0].start - margin <= peak_row < defect_square[0].stop + margin
    assert defect_square[1].start - margin <= peak_col < defect_square[1].stop + margin


def test_state_dict_round_trip_through_safetensors(
    model: PatchCore, make_model, smooth_images, with_square, tmp_path
) -> None:
    images = with_square(smooth_images(2, seed=5))
    expected = model(images)
    save_file(model.state_dict(), tmp_path / "patchcore.safetensors")

    restored = make_model()
    assert not restored.is_fitted
    restored.load_state_dict(load_file(tmp_path / "patchcore.safetensors"))
    assert restored.is_fitted
    actual = restored(images)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map, rtol=0, atol=0)
    torch.testing.assert_close(actual.image_score, expected.image_score, rtol=0, atol=0)


def test_loading_into_a_fitted_model_rebuilds_the_index(
    model: PatchCore, fitted_model, smooth_images
) -> None:
    other = fitted_model(seed=1)  # same bank size, other coreset
    images = smooth_images(2, seed=6)
    target = copy.deepcopy(model)  # holds a cached faiss index, built for the other bank
    target.load_state_dict(other.state_dict())
    torch.testing.assert_close(target(images).anomaly_map, other(images).anomaly_map, rtol=0, atol=0)


def test_unfitted_forward_raises(make_model, smooth_images) -> None:
    with pytest.raises(RuntimeError, match="PatchCore is not fitted"):
        make_model()(smooth_images(1, seed=0))


def test_reweighting_scales_scores_by_a_factor_in_unit_interval(
    model: PatchCore, make_model, smooth_images, with_square
) -> None:
    reweighted = make_model(reweight=True, reweight_neighbors=9, knn_backend="torch")
    reweighted.load_state_dict(model.state_dict())
    images = torch.cat([smooth_images(3, seed=7), with_square(smooth_images(1, seed=8))])

    plain, weighted = model(images).image_score, reweighted(images).image_score
    assert torch.isfinite(weighted).all()
    assert (weighted >= 0).all()
    assert (weighted <= plain * 1.0).all()
    torch.testing.assert_close(reweighted(images).anomaly_map, model(images).anomaly_map)


def test_a_single_thread_block_leaves_other_threads_their_count() -> None:
    """The projection's one thread is this thread's setting, not the process's: the main thread keeps its
    count while a worker projects, and the worker gets its own back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    inside, leave, seen = threading.Event(), threading.Event(), {}

    def worker() -> None:
        torch.set_num_threads(2)
        with single_cpu_thread():
            seen["inside"] = torch.get_num_threads()
            inside.set()
            leave.wait(10)
        seen["after"] = torch.get_num_threads()

    try:
        thread = threading.Thread(target=worker)
        thread.start()
        assert inside.wait(10)
        seen["main"] = torch.get_num_threads()
        leave.set()
        thread.join(10)
        assert seen == {"inside": 1, "main": 2, "after": 2}
    finally:
        torch.set_num_threads(threads)
