"""Relevance maps, image-property correlates, agreement and caption probes (analyses.methods.attribution)."""
import colorsys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from PIL import Image

from analyses.methods import attribution as attr
from datamodules.synthetic_images import CATEGORIES, draw_image
from encoders.backbones import build_backbone
from encoders.dense import dense_features
from encoders.distill import distill, make_views
from encoders.heads import LinearHead
from encoders.model import EncodingModel
from encoders.text import TextEncoder
from encoders.trained import TrainedEncoder


def encoder_with_head(backbone, head, mean, std) -> TrainedEncoder:
    """A TrainedEncoder as load_trained builds it, with a given head and standardisation."""
    n_voxels = head(torch.zeros(1, backbone.n_features)).shape[1]
    model = EncodingModel(head, backbone.n_features, n_voxels, backbone=backbone)
    model.set_feature_stats(torch.as_tensor(mean), torch.as_tensor(std))
    return TrainedEncoder(model.eval(), {}, {}, Path("planted_run"))


def test_planted_voxel_gets_its_pattern_side():
    """A voxel whose head weight is the (contrasted) dense feature direction of a pattern: a synthetic face,
    shrunk to one 8-px patch and tiled. An image carrying the pattern on its left half (the other half
    from another synthetic image) gets more relevance on the left, and the mirrored image on the right.
    Robust with random weights: MaskCLIP's last block keeps each patch's own content, and the tiled pattern
    gives every left patch that same content (checked over 10 random ViTs while writing this test)."""
    torch.manual_seed(0)
    bb = build_backbone("tiny_vit", layers=["embed"], normalize=True)
    dense = dense_features(bb)
    assert dense.method == "maskclip"
    rng = np.random.default_rng(10)
    tile = np.asarray(Image.fromarray(draw_image("face", rng, 64)).resize((8, 8), Image.BILINEAR))
    pattern = np.tile(tile, (8, 4, 1))  # 64 x 32
    others = [draw_image(c, rng, 64) for c in CATEGORIES for _ in range(2)]
    views = make_views(9, 2, seed=0)

    def features(images):
        x = torch.stack([dense.transform(np.array(im)) for im in images])
        return distill(dense, x, views, dense.patch_size, normalize=True)

    u = features([np.concatenate([pattern, pattern], 1)]).mean((0, 1, 2)) - features(others[::2]).mean((0, 1, 2))
    # The run's standardisation (any statistics), and a head computing u·f for voxel 1 (voxel 0: -u·f).
    mean, std = np.full(64, 0.01, np.float32), np.linspace(0.5, 2, 64).astype(np.float32)
    head = LinearHead(64, 2)
    with torch.no_grad():
        head.linear.weight.copy_(torch.stack([-u, u]) * torch.as_tensor(std))
        head.linear.bias.copy_(torch.stack([-u, u]) @ torch.as_tensor(mean))
    enc = encoder_with_head(bb, head, mean, std)
    names, A = attr.roi_columns({"all": np.ones(2, bool)}, voxels=[1])
    readout = attr.Readout(enc, A)
    halves = [other[:, 16:48] for other in others[1::2]]
    f = features([np.concatenate([pattern, h], 1) for h in halves] + [np.concatenate([h, pattern], 1) for h in halves])
    maps = attr.relevance_maps(f, readout)[:, 1]
    left, right = maps[:len(halves)], maps[len(halves):]
    assert (left[:, :, :4].mean((1, 2)) > left[:, :, 4:].mean((1, 2))).all()
    assert (right[:, :, 4:].mean((1, 2)) > right[:, :, :4].mean((1, 2))).all()
    # the readout is the head's own prediction from each patch feature: u·f
    np.testing.assert_allclose(maps, (f @ u).numpy(), atol=1e-4)
    assert names == ["all", "voxel1"]


def test_linear_readout_equals_the_heads_predictions():
    torch.manual_seed(1)
    bb = build_backbone("tiny_vit", layers=["embed"])
    head = LinearHead(64, 5)
    torch.nn.init.normal_(head.linear.weight)
    torch.nn.init.normal_(head.linear.bias)
    mean, std = np.random.default_rng(0).normal(size=64).astype(np.float32), np.full(64, 2.0, np.float32)
    fast = encoder_with_head(bb, head, mean, std)
    generic = encoder_with_head(bb, torch.nn.Sequential(head), mean, std)  # not recognised as linear
    names, A = attr.roi_columns({"a": np.array([1, 1, 0, 0, 0], bool), "b": np.array([0, 0, 1, 1, 1], bool)}, [4])
    f = torch.randn(30, 64)
    ra = attr.Readout(fast, A)
    rb = attr.Readout(generic, A, max_elements=40)  # 8 rows per chunk
    assert ra.weight is not None and rb.weight is None
    pred = ((f - torch.as_tensor(mean)) / 2.0) @ head.linear.weight.T + head.linear.bias
    expected = torch.stack([pred[:, :2].mean(1), pred[:, 2:].mean(1), pred[:, 4]], 1).detach().numpy()
    np.testing.assert_allclose(ra(f), expected, atol=1e-4)
    np.testing.assert_allclose(rb(f), expected, atol=1e-4)
    maps = attr.relevance_maps(f.reshape(2, 3, 5, 64), ra)
    assert maps.shape == (2, 3, 3, 5)
    np.testing.assert_allclose(maps[1, 2, 0, 4], expected[1 * 15 + 4, 2], atol=1e-5)


def test_roi_columns_and_refusals():
    names, A = attr.roi_columns({"x": np.array([1, 0, 1, 0], bool), "empty": np.zeros(4, bool)}, [3])
    assert names == ["x", "voxel3"]
    np.testing.assert_allclose(A, [[0.5, 0], [0, 0], [0.5, 0], [0, 1]])
    with pytest.raises(ValueError, match="voxel index 9"):
        attr.roi_columns({"x": np.ones(4, bool)}, [9])
    torch.manual_seed(0)
    bb = build_backbone("tiny_vit", layers=["blocks.1"])
    enc = encoder_with_head(bb, LinearHead(64, 2), np.zeros(64, np.float32), np.ones(64, np.float32))
    with pytest.raises(ValueError, match=r"backbone.layers=\[embed\].*blocks.1"):
        attr.check_embedding_run(enc)


def test_property_correlations_match_scipy():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 6, 5, 3), dtype=np.uint8)
    lum, sat = attr.luminance(images), attr.saturation(images)
    px = images[1, 2, 3] / 255.0
    assert sat[1, 2, 3] == pytest.approx(colorsys.rgb_to_hsv(*px)[1])
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in px]
    assert lum[1, 2, 3] == pytest.approx(0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2])
    assert attr.luminance(np.full((1, 1, 1, 3), 255, np.uint8))[0, 0, 0] == pytest.approx(1.0)
    maps = rng.normal(size=(3, 2, 6, 5))
    maps[2, 1] = 7.0  # a constant map: no correlation defined
    r = attr.pixel_correlation(maps, lum)
    for i in range(3):
        assert r[i, 0] == pytest.approx(scipy.stats.pearsonr(maps[i, 0].ravel(), lum[i].ravel())[0])
    assert np.isnan(r[2, 1])
    st = attr.summarize(r)
    t, p = scipy.stats.ttest_1samp(r[:, 0], 0.0)
    assert st[0]["t"] == pytest.approx(t) and st[0]["p"] == pytest.approx(p) and st[0]["n"] == 3
    assert st[1]["n"] == 2
    up = attr.upsample(maps[:, :1], (12, 10))
    assert up.shape == (3, 1, 12, 10) and np.allclose(up.mean((2, 3)), maps[:, :1].mean((2, 3)), atol=0.2)
    other = rng.normal(size=(3, 4, 6, 5))
    rc = attr.map_correlation(maps, other)
    assert rc.shape == (3, 2, 4)
    assert rc[1, 0, 3] == pytest.approx(scipy.stats.pearsonr(maps[1, 0].ravel(), other[1, 3].ravel())[0])


def test_caption_probe_finds_the_category_of_the_region():
    """Patch features set to two captions' text embeddings (left: a face caption, right: a food caption); an
    ROI map that is high on the left correlates best with a face caption."""
    torch.manual_seed(0)
    bb = build_backbone("tiny_clip", layers=["embed"])
    captions = {"face": ["A photo of a face", "A portrait photo"], "food": ["A photo of food", "A photo of pizza"],
                "word": ["A photo of words"]}
    flat = [c for k in captions for c in captions[k]]
    index = np.array([i for i, k in enumerate(captions) for _ in captions[k]])
    text = TextEncoder.from_backbone(bb).encode(flat)  # the one text-embedding path (encoders.text)
    assert text.shape == (5, 64) and np.allclose(np.linalg.norm(text, axis=1), 1, atol=1e-5)
    feats = np.zeros((1, 4, 4, 64), np.float32)
    feats[0, :, :2] = text[0] + 0.05 * np.random.default_rng(0).normal(size=(4, 2, 64))
    feats[0, :, 2:] = text[2] + 0.05 * np.random.default_rng(1).normal(size=(4, 2, 64))
    cmaps = attr.caption_maps(feats, text)
    f0 = feats[0, 1, 3] / np.linalg.norm(feats[0, 1, 3])
    assert cmaps.shape == (1, 5, 4, 4) and cmaps[0, 4, 1, 3] == pytest.approx(float(f0 @ text[4]), abs=1e-5)
    roi = np.zeros((1, 2, 4, 4))
    roi[0, 0, :, :2] = 1.0                           # a "face region" map
    roi[0, 1] = np.random.default_rng(2).normal(size=(4, 4)) + 3 * (np.arange(4) >= 2)   # food-ish side
    winner, best = attr.assign_categories(attr.map_correlation(roi, cmaps), index, 3)
    assert winner.tolist() == [[0, 1]]
    assert best.shape == (1, 2, 3) and best[0, 0, 0] > best[0, 0, 1]
    with pytest.raises(ValueError, match="no text tower"):
        TextEncoder.from_backbone(build_backbone("tiny_vit")).encode(flat)
