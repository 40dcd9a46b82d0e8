"""Mixed precision: only the backbone autocasts; the head, its loss and the metrics stay float32.

Stated tolerance (bf16-mixed on CPU, tiny backbone, features=online, linear head): per-voxel test r
within 0.01 of the float32 run, mean test r within 0.002 (measured: max 0.0025, median 0.0003).
"""
import numpy as np
import pytest
import torch

from encoders.backbones import build_backbone
from encoders.heads import LinearHead
from encoders.model import EncodingModel
from train import ConfigError, train

RUN = ["experiment=demo", "logger=none", "trainer.max_epochs=2", "trainer.enable_progress_bar=false",
       "features=online", "head=linear"]


@pytest.mark.filterwarnings("ignore:You are trying to `self.log()`")
def test_only_the_backbone_autocasts():
    torch.manual_seed(0)
    backbone = build_backbone("tiny")
    head = LinearHead(backbone.n_features, 7)
    torch.nn.init.normal_(head.linear.weight)
    model = EncodingModel(head, backbone.n_features, 7, backbone=backbone)
    images = torch.randn(6, 3, 64, 64)
    with torch.no_grad():
        full = model.features(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model.features(images)
            pred = model(images)
            loss = model.training_step({"x": images, "y": torch.randn(6, 7)}, 0)
        expected = head(mixed)  # the float32 head applied to the bf16 backbone's features
    assert mixed.dtype == pred.dtype == loss.dtype == torch.float32
    assert 0 < (mixed - full).abs().max() < 0.05 * full.abs().max()  # the backbone did run in bf16
    torch.testing.assert_close(pred, expected, rtol=0, atol=0)  # the head did not


def test_bf16_mixed_metrics_stay_within_tolerance_of_float32(make_cfg, synthetic_root, tmp_path):
    data = [f"data.root={synthetic_root}", "data.synthetic=null"]
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        cfg = make_cfg([*RUN, *data, f"precision={precision}"], run_dir=tmp_path / precision)
        result = train(cfg, tmp_path / precision)
        assert result.model.trainer.precision == precision
        runs[precision] = (result.metrics, np.load(tmp_path / precision / "voxel_metrics.npz"))
    (m32, v32), (m16, v16) = runs["32-true"], runs["bf16-mixed"]
    diff = np.abs(v32["test_r"] - v16["test_r"])
    assert np.isfinite(diff).sum() > 100
    assert np.nanmax(diff) < 0.01 and abs(m32["test"]["r_mean"] - m16["test"]["r_mean"]) < 0.002
    assert np.nanmax(diff) > 0  # not the same computation


def test_precisions_that_would_lower_the_head_are_refused(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="bf16-true"):
        train(make_cfg(["trainer.precision=bf16-true", "logger=none"]), tmp_path / "run")
    with pytest.raises(ConfigError, match="16-mixed needs a GPU"):
        train(make_cfg(["precision=16-mixed", "trainer=cpu", "logger=none"]), tmp_path / "run2")
