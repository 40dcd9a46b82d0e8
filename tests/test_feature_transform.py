"""The encoder's feature transform: its frame stage reproduces the datamodule's fitted reducer (scikit-learn
PCA) exactly, it round-trips through head.pt's state, and its standardisation is train.py's."""
import numpy as np
import pytest
import torch

from datamodules.video_features import FeatureReducer
from encoders.feature_transform import FeatureTransform


def frames(n=300, seed=0):
    """Frame features with correlated columns (so the PCAs keep fewer components than columns)."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 6))
    mixing = rng.normal(size=(6, 20))
    return (latent @ mixing * rng.uniform(0.5, 3, 20) + rng.normal(0, 0.05, (n, 20)) + 4).astype(np.float32)


@pytest.mark.parametrize("variance, slices", [(None, None), (0.95, None),
                                              (0.9, {"a": slice(0, 8), "b": slice(8, 20)})])
def test_frame_stage_reproduces_the_reducer(variance, slices):
    train, other = frames(), frames(50, seed=1)
    reducer = FeatureReducer(slices, variance).fit(train)
    t = FeatureTransform(reducer.n_components_)
    t.set_frame_stage(reducer, {"hrf": "wen"})
    for x in (train, other):
        np.testing.assert_allclose(t.frame_stage(torch.from_numpy(x)).numpy(), reducer.transform(x),
                                   rtol=1e-10, atol=1e-10)
    if variance is not None:
        assert reducer.n_components_ < 20  # the PCA did reduce
    per_tr = reducer.transform(train)[::3]  # stands for the datamodule's per-TR features
    t.set_standardisation(torch.from_numpy(per_tr.mean(0)).float(), torch.from_numpy(per_tr.std(0, ddof=1)).float())
    z = t.from_backbone(torch.from_numpy(other)).numpy()
    expected = (reducer.transform(other) - per_tr.mean(0)) / per_tr.std(0, ddof=1)
    np.testing.assert_allclose(z, expected, rtol=1e-4, atol=1e-4)  # float32 standardisation
    # head.pt's state rebuilds the same transform
    back = FeatureTransform.from_state(t.state())
    assert back.has_frame_stage and back.temporal == {"hrf": "wen"} and back.n_backbone == 20
    np.testing.assert_array_equal(back.from_backbone(torch.from_numpy(other)).numpy(), z)
    assert t.describe()["frame_stage"]["n_out"] == reducer.n_components_


def test_without_a_frame_stage_it_is_train_pys_standardisation():
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(3, 2, (40, 5)).astype(np.float32))
    x[:, 4] = 1.0  # a constant column: std floored at 1e-6 of the largest
    t = FeatureTransform(5)
    t.set_standardisation(x.mean(0), x.std(0))
    std = x.std(0).clamp(min=float(x.std(0).max()) * 1e-6)
    torch.testing.assert_close(t.from_backbone(x), (x - x.mean(0)) / std)
    torch.testing.assert_close(t.standardise(x), t.from_backbone(x))
    assert not FeatureTransform.from_state(t.state()).has_frame_stage and t.describe()["frame_stage"] is None
    with pytest.raises(ValueError, match="frame stage gives 20 features, the head takes 5"):
        t.set_frame_stage(FeatureReducer(None, None).fit(frames()))
