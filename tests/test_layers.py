"""analyses.methods.layers: single-layer contributions and the best layer per voxel, on planted heads."""
import numpy as np
import pytest
import torch
from sklearn.metrics import r2_score as sk_r2

from analyses.methods import layers
from encoders.backbones import build_backbone


def test_layer_slices_match_the_backbone():
    bb = build_backbone("tiny", layers=["conv1", "conv3", "embed"])
    assert layers.layer_slices(bb.feature_dims) == bb.feature_slices
    with pytest.raises(ValueError, match="width 0"):
        layers.layer_slices({"a": 3, "b": 0})


def test_keep_one_layer_zeroes_every_other_column():
    slices = layers.layer_slices({"a": 2, "b": 3, "c": 1})
    z = np.arange(12, dtype=np.float32).reshape(2, 6) + 1
    kept = layers.keep_one_layer(z, slices, "b")
    np.testing.assert_array_equal(kept[:, 2:5], z[:, 2:5])
    assert not kept[:, :2].any() and not kept[:, 5:].any()
    with pytest.raises(ValueError, match="6 columns"):
        layers.keep_one_layer(z[:, :5], slices, "a")


def planted_head(n=300, seed=0):
    """Three layers (widths 4, 5, 6); voxel v reads only layer v % 3, plus noise."""
    rng = np.random.default_rng(seed)
    slices = layers.layer_slices({"low": 4, "mid": 5, "high": 6})
    z = rng.standard_normal((n, 15)).astype(np.float32)
    weight = np.zeros((15, 9), np.float32)
    truth = np.arange(9) % 3
    for v, layer in enumerate(truth):
        sl = list(slices.values())[layer]
        weight[sl, v] = rng.standard_normal(sl.stop - sl.start)
    true = z @ weight + 0.5 * rng.standard_normal((n, 9))
    head = torch.nn.Linear(15, 9, bias=False)
    head.weight.data = torch.from_numpy(weight.T.copy())

    def predict(x):
        with torch.no_grad():
            return head(torch.as_tensor(x)).numpy()

    return predict, z, true, slices, truth


def test_layer_scores_recover_the_planted_layer_and_match_sklearn():
    predict, z, true, slices, truth = planted_head()
    scores = layers.layer_scores(predict, z, true, slices)  # R²
    assert scores.shape == (3, 9)
    for i, name in enumerate(slices):
        pred = predict(layers.keep_one_layer(z, slices, name))
        np.testing.assert_allclose(scores[i], sk_r2(true, pred, multioutput="raw_values"), atol=1e-6)
    np.testing.assert_array_equal(layers.best_layer(scores), truth)
    r_scores = layers.layer_scores(predict, z, true, slices, score="r")
    np.testing.assert_array_equal(layers.best_layer(r_scores), truth)
    with pytest.raises(ValueError, match="score must be"):
        layers.layer_scores(predict, z, true, slices, score="mse")


def test_single_layer_predictions_are_those_of_the_zeroed_features():
    predict, z, _, slices, _ = planted_head(n=20)
    got = dict(layers.single_layer_predictions(predict, z, slices))
    assert list(got) == ["low", "mid", "high"]
    np.testing.assert_allclose(sum(got.values()), predict(z), atol=1e-5)  # a linear head without bias: parts sum up


def test_best_layer_ignores_nan_and_counts_per_roi():
    scores = np.array([[0.1, np.nan, 0.5, np.nan], [0.3, 0.2, 0.4, np.nan]])
    best = layers.best_layer(scores)
    np.testing.assert_array_equal(best, [1, 1, 0, -1])
    rois = {"a": np.array([True, True, False, False]), "b": np.array([2, 3])}
    counts = layers.best_layer_counts(best, rois, n_layers=2)
    np.testing.assert_array_equal(counts["a"], [0, 2])
    np.testing.assert_array_equal(counts["b"], [1, 0])  # the all-NaN voxel is left out


def test_best_layer_figure(tmp_path):
    from analyses.jobs.wen2018_figures import plot_best_layer_per_roi

    path = plot_best_layer_per_roi({"V1": np.array([5, 1, 0]), "FFA": np.array([0, 2, 4])},
                                   ["conv1", "conv2", "conv3"], tmp_path / "best.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
