"""PaDiM: statistics against numpy, the embedding, seeded channel selection, Mahalanobis by definition,
state round trips."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from anomaly.methods.padim import model as padim_model
from anomaly.methods.padim.model import Padim


@pytest.fixture
def backbone(tiny_backbone):
    return tiny_backbone()


@pytest.mark.parametrize("float32_run", [1024, 2])  # 2: float32 sums move into the totals mid-stream
def test_statistics_equal_direct_numpy_computation(smooth_images, backbone, monkeypatch, float32_run):
    monkeypatch.setattr(padim_model, "FLOAT32_RUN", float32_run)
    model = Padim(backbone, n_features=10, seed=3)
    images = smooth_images(7, seed=0)
    for batch in images.split(3):  # streaming over uneven batches
        model.collect(batch)
    model.fit()

    embedding = model.embed(images).flatten(0, 1).double().numpy()  # [P, N, D]
    for position in (0, 5, embedding.shape[0] - 1):
        x = embedding[position]
        expected_mean = x.mean(axis=0)
        expected_cov = np.cov(x, rowvar=False) + 0.01 * np.eye(10)
        np.testing.assert_allclose(model.mean[position].numpy(), expected_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            model.inv_covariance[position].double().numpy(), np.linalg.inv(expected_cov), rtol=1e-3, atol=1e-3
        )


def test_embedding_is_the_concatenation_of_upsampled_layers_with_the_selected_channels(
    smooth_images, backbone
):
    """Deeper layers are interpolated linearly at each first-layer cell's centre.

    The tiny backbone's cells of stride s lie on pixels s·i, so first-layer cell i (pixel 4i) reads the
    stride-s map at 4i/s, between its cells (the last one beyond the edge cell's centre: that cell).
    """
    model = Padim(backbone, n_features=12, seed=5)
    images = smooth_images(3, seed=0)
    features = list(backbone(images).values())
    grid = features[0].shape[-2:]
    assert any(feature.shape[-2:] != grid for feature in features)  # the test covers upsampling
    upsampled = []
    for feature, stride in zip(features, backbone.strides, strict=True):
        at = (4 * torch.arange(grid[0]) / stride).clamp(max=feature.shape[-1] - 1)
        low = at.floor().long().clamp(max=max(feature.shape[-1] - 2, 0))
        high = (low + 1).clamp(max=feature.shape[-1] - 1)
        share = at - low
        rows = feature[:, :, low] * (1 - share)[:, None] + feature[:, :, high] * share[:, None]
        upsampled.append(rows[..., low] * (1 - share) + rows[..., high] * share)
    expected = torch.cat(upsampled, dim=1).index_select(1, model.channel_index)  # [B, D, h, w]
    torch.testing.assert_close(model.embed(images), expected.permute(2, 3, 0, 1))


def test_a_model_with_unsorted_channels_from_an_older_version_is_refused(smooth_images, backbone):
    model = Padim(backbone, n_features=12, seed=5)
    state = {**model.state_dict(), "channel_index": model.channel_index.flip(0)}
    with pytest.raises(RuntimeError, match=r"older version.*Fit it again"):
        model.load_state_dict(state)


def test_channel_selection_is_seeded_and_mahalanobis_matches_definition(smooth_images, backbone):
    a, b = Padim(backbone, n_features=10, seed=1), Padim(backbone, n_features=10, seed=1)
    assert torch.equal(a.channel_index, b.channel_index)
    assert not torch.equal(a.channel_index, Padim(backbone, n_features=10, seed=2).channel_index)

    a.collect(smooth_images(6, seed=0))
    a.fit()
    x = a.embed(smooth_images(2, seed=9)).flatten(0, 1)  # [P, B, D]
    delta = (x[4, 1] - a.mean[4]).double()
    expected = torch.sqrt(delta @ a.inv_covariance[4].double() @ delta)
    assert a.mahalanobis(x)[4, 1].item() == pytest.approx(expected.item(), rel=1e-4)


def test_one_image_fits_with_the_regulariser_and_scores_the_euclidean_distance_over_sqrt_epsilon(
    smooth_images, backbone
):
    """k = 1 (a one-shot run): the covariance of one image is 0, so with ε·I a position's Mahalanobis
    distance is the Euclidean distance to that image's feature there, divided by √ε."""
    model = Padim(backbone, n_features=10, covariance_epsilon=0.04)
    assert model.minimum_training_images()[0] == 1
    image = smooth_images(1, seed=0)
    model.collect(image)
    model.fit()
    assert int(model.count) == 1 and torch.equal(model.covariance, torch.zeros_like(model.covariance))
    x = model.embed(smooth_images(2, seed=9)).flatten(0, 1)  # [P, B, D]
    expected = (x - model.embed(image).flatten(0, 1)).norm(dim=-1) / 0.2
    torch.testing.assert_close(model.mahalanobis(x), expected, rtol=1e-4, atol=1e-4)


def test_anomalous_image_scores_higher_and_state_round_trips(smooth_images, backbone, tmp_path):
    model = Padim(backbone, n_features=20, seed=0)
    model.collect(smooth_images(16, seed=0))
    model.fit()
    normal = smooth_images(4, seed=100)
    defective = normal.clone()
    defective[:, 0, 16:32, 16:32], defective[:, 1, 16:32, 16:32] = 1.0, 0.0  # a magenta square
    normal_out, defect_out = model(normal), model(defective)
    assert normal_out.anomaly_map.shape == (4, 1, 64, 64)
    assert (defect_out.image_score > 1.5 * normal_out.image_score).all()
    peak = defect_out.anomaly_map[0, 0].argmax()
    assert 8 <= peak // 64 < 40 and 8 <= peak % 64 < 40

    path = tmp_path / "padim.safetensors"
    save_file({k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}, str(path))
    reloaded = Padim(backbone, n_features=20, seed=0)
    reloaded.load_state_dict(load_file(str(path)), strict=False)
    assert torch.equal(reloaded(defective).image_score, defect_out.image_score)


def test_unfitted_model_refuses_to_score(smooth_images, backbone):
    with pytest.raises(RuntimeError, match="not fitted"):
        Padim(backbone, n_features=10)(smooth_images(1, seed=0))


def test_the_inverse_covariances_hold_after_torch_set_num_threads():
    """MKL 2024.2's batched LU (torch.linalg.inv) fails for D >= ~200 once torch.set_num_threads was called
    (num_threads=..., the joblib launcher): the Cholesky inverse PaDiM uses does not."""
    threads = torch.get_num_threads()
    factors = torch.rand(16, 256, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    covariance = factors @ factors.transpose(1, 2)
    try:
        torch.set_num_threads(2)
        inverse = padim_model.regularised_inverse(covariance, 0.01)
    finally:
        torch.set_num_threads(threads)
    expected = np.linalg.inv(covariance.numpy() + 0.01 * np.eye(256))
    np.testing.assert_allclose(inverse.double().numpy(), expected, rtol=1e-4, atol=1e-3)
