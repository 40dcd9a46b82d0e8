"""Feature cache: computed once per key, never reused for another key, atomic under SIGKILL."""
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from encoders.backbones import FrozenBackbone, build_backbone
from encoders.feature_cache import FeatureCache
from tests.conftest import REPO
from train import train

IMAGES = torch.randn(40, 3, 64, 64, generator=torch.Generator().manual_seed(0))
STIMULI = {"file": "in-memory", "size": 40}


def loader(ids):
    return DataLoader(IMAGES[torch.as_tensor(ids)], batch_size=8)


def counting(backbone):
    calls = []
    backbone.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    return calls


def test_second_load_is_a_hit_and_matches_a_direct_forward(tmp_path):
    torch.manual_seed(0)
    backbone = build_backbone("tiny")
    calls = counting(backbone)
    cache = FeatureCache(tmp_path)
    ids = np.arange(40)[::-1].copy()
    first = cache.load_or_build(backbone, ids, STIMULI, loader)
    assert first.status == "built" and sum(calls) == 40
    second = cache.load_or_build(backbone, ids, STIMULI, loader)
    assert second.status == "hit" and sum(calls) == 40  # no new forward
    with torch.no_grad():
        direct = backbone(IMAGES[torch.as_tensor(ids)])
    torch.testing.assert_close(second.features, direct)
    assert first.key == second.key and second.path.exists()
    assert not list(tmp_path.glob("*.partial"))


def test_anything_that_changes_features_changes_the_key(tmp_path):
    torch.manual_seed(0)
    base = build_backbone("tiny")
    cache = FeatureCache(tmp_path)
    ids = np.arange(16)
    keys = {cache.load_or_build(base, ids, STIMULI, loader).key}
    torch.manual_seed(1)
    keys.add(cache.load_or_build(build_backbone("tiny"), ids, STIMULI, loader).key)  # other weights
    other_layers = FrozenBackbone(base.spec, base.model, layers=["conv3"])
    keys.add(cache.load_or_build(other_layers, ids, STIMULI, loader).key)
    keys.add(cache.load_or_build(FrozenBackbone(base.spec, base.model, normalize=True), ids, STIMULI, loader).key)
    keys.add(cache.load_or_build(base, ids[:8], STIMULI, loader).key)  # other stimuli
    keys.add(cache.load_or_build(base, ids, {"file": "elsewhere"}, loader).key)
    assert len(keys) == 6 and len(list(tmp_path.glob("*.h5"))) == 6


def test_different_layers_or_transforms_never_share_an_entry(tmp_path):
    """The key holds each layer's module and pooling and the exact preprocessing spec: a change to any of
    them is another entry, even where (as here, images fed directly) the features would not change."""
    def tiny(**kwargs):
        torch.manual_seed(0)
        return build_backbone("tiny", **{"layers": ["conv2"], **kwargs})

    base = tiny()
    cache = FeatureCache(tmp_path)
    ids = np.arange(16)
    first = cache.load_or_build(base, ids, STIMULI, loader)
    assert cache.load_or_build(tiny(), ids, STIMULI, loader).status == "hit"  # the same build: the same entry
    variants = {
        "a module path": tiny(layers=["conv2.0"]),  # the conv before its BatchNorm
        "another pooling": tiny(pooling="max"),
        "a grid pooling": tiny(pooling="avg2x2"),
        "crop_pct": tiny(crop_pct=0.875),
        "image_size": tiny(image_size=48),
        "interpolation": tiny(interpolation="bicubic"),
        "mean": tiny(mean=[0.5, 0.5, 0.5]),
    }
    keys = {first.key}
    for what, backbone in variants.items():
        result = cache.load_or_build(backbone, ids, STIMULI, loader)
        assert result.status == "built" and result.key not in keys, what
        keys.add(result.key)
    described = json.loads(h5py.File(first.path, "r").attrs["description"])["spec"]
    assert described["layers"] == {"conv2": {"module": "conv2", "pooling": "avg", "width": 32}}
    assert described["preprocess"] == {"crop_size": 64, "resize_size": 64, "resize_mode": "shortest",
                                       "interpolation": "bilinear", "antialias": True,
                                       "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def test_a_cache_whose_stored_key_differs_is_rebuilt_not_used(tmp_path, caplog):
    torch.manual_seed(0)
    backbone = build_backbone("tiny")
    cache = FeatureCache(tmp_path)
    first = cache.load_or_build(backbone, np.arange(16), STIMULI, loader)
    with h5py.File(first.path, "r+") as f:
        f.attrs["key"] = "0" * 64
        f["features"][...] = 0
    with caplog.at_level(logging.WARNING):
        again = cache.load_or_build(backbone, np.arange(16), STIMULI, loader)
    assert again.status == "rebuilt" and "rebuilding" in caplog.text
    torch.testing.assert_close(again.features, first.features)


KILLED_WORKER = textwrap.dedent("""
    import sys, time, numpy as np, torch
    from torch.utils.data import DataLoader
    from encoders.backbones import build_backbone
    from encoders.feature_cache import FeatureCache
    images = torch.randn(40, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    backbone = build_backbone("tiny", weights_path=sys.argv[2])
    def slow(module, inputs, output):
        print("batch", flush=True)
        time.sleep(0.5)
    backbone.register_forward_hook(slow)
    FeatureCache(sys.argv[1]).load_or_build(backbone, np.arange(40), {"file": "in-memory", "size": 40},
        lambda ids: DataLoader(images[torch.as_tensor(ids)], batch_size=8), "cpu")
    print("finished", flush=True)
""")


def test_killed_extraction_leaves_no_trusted_file_and_is_resumed(tmp_path, caplog):
    torch.manual_seed(0)
    weights = tmp_path / "tiny.pt"
    torch.save(build_backbone("tiny").state_dict(), weights)
    cache_dir = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WORKER, str(cache_dir), str(weights)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    seen = 0
    for line in proc.stdout:
        seen += line.startswith("batch")
        if seen == 3:  # two batches written and flushed, the third in flight
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not list(cache_dir.glob("*.h5")) and len(list(cache_dir.glob("*.h5.partial"))) == 1

    backbone = build_backbone("tiny", weights_path=str(weights))
    calls = counting(backbone)
    with caplog.at_level(logging.WARNING):
        result = FeatureCache(cache_dir).load_or_build(backbone, np.arange(40), STIMULI, loader)
    assert result.status == "resumed" and "resuming" in caplog.text
    assert sum(calls) < 40  # only the missing rows were extracted
    with torch.no_grad():
        torch.testing.assert_close(result.features, backbone(IMAGES))
    assert not list(cache_dir.glob("*.partial"))


FAST = ["experiment=demo", "trainer.max_epochs=4", "trainer.enable_progress_bar=false", "logger=none"]


def test_second_training_run_reads_the_cache(make_cfg, synthetic_root, tmp_path, monkeypatch):
    calls = []
    original = FrozenBackbone.forward
    monkeypatch.setattr(FrozenBackbone, "forward", lambda self, x: calls.append(len(x)) or original(self, x))
    overrides = FAST + [f"data.root={synthetic_root}", "data.synthetic=null", "features=cached"]
    first = train(make_cfg(overrides, tmp_path / "a"), tmp_path / "a")
    n_images = sum(calls)
    assert n_images == sum(len(v) for v in first.datamodule.split_ids.values())
    second = train(make_cfg(overrides + ["head=mlp"], tmp_path / "b"), tmp_path / "b")
    assert sum(calls) == n_images  # no backbone forward at all in the second run
    info_a = json.loads((tmp_path / "a" / "run.json").read_text())["features"]
    info_b = json.loads((tmp_path / "b" / "run.json").read_text())["features"]
    assert info_a["cache_status"] == "built" and info_b["cache_status"] == "hit"
    assert info_a["cache_key"] == info_b["cache_key"]
    assert second.metrics["test"]["n_voxels"] == first.metrics["test"]["n_voxels"]


@pytest.mark.parametrize("mode", ["precompute", "online"])
def test_other_feature_modes_give_the_same_linear_fit(make_cfg, synthetic_root, tmp_path, mode):
    overrides = FAST + [f"data.root={synthetic_root}", "data.synthetic=null", "trainer.max_epochs=2"]
    cached = train(make_cfg(overrides, tmp_path / "c"), tmp_path / "c").metrics
    other = train(make_cfg(overrides + [f"features={mode}"], tmp_path / mode), tmp_path / mode).metrics
    assert other["test"]["r_mean"] == pytest.approx(cached["test"]["r_mean"], abs=1e-4)


def test_ridge_head_matches_or_beats_linear(make_cfg, synthetic_root, tmp_path):
    base = [f"data.root={synthetic_root}", "data.synthetic=null", "experiment=demo", "logger=none",
            "trainer.enable_progress_bar=false"]
    ridge = train(make_cfg(base + ["head=ridge"], tmp_path / "ridge"), tmp_path / "ridge").metrics
    linear = train(make_cfg(base, tmp_path / "linear"), tmp_path / "linear").metrics
    assert ridge["test"]["nc_r2_mean"] >= linear["test"]["nc_r2_mean"] - 0.005, (ridge["test"], linear["test"])
    cv = np.load(tmp_path / "ridge" / "ridge_cv.npz")
    assert cv["cv_scores"].shape == (19, ridge["test"]["n_voxels"]) and len(np.unique(cv["best_alphas"])) > 1
    assert (tmp_path / "ridge" / "checkpoints" / "last.ckpt").exists()
