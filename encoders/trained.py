"""Load a trained encoder back from its run directory, ready to predict from images or features.

    from encoders.trained import load_trained
    enc = load_trained("outputs/runs/2026-01-01_12-00-00_tiny_ridge")
    pred = enc.predict_images(images)          # uint8 (n, H, W, 3) or a list of (H, W, 3) -> (n, n_voxels)
    raw = enc.image_features(images)           # the backbone's features (n, F)
    z = enc.head_inputs(raw)                   # the head's input (n, n_features): the run's fitted transform
    pred = enc.predict_standardised(z)         # the head alone (e.g. with some layers zeroed)
    pred = enc.predict_features(x)             # per-sample features (n, n_features) -> standardise -> head
    enc.feature_slices                         # {layer: slice of its columns in the features}
    raw = enc.cached_features(ids)             # the run's own feature cache rows for these stimulus ids

What is read, through :class:`encoders.run_dir.RunDir`: ``config.yaml`` (the backbone and head sections,
the seed), ``head.pt`` (head weights, feature standardisation, n_features, n_voxels, backbone name and
layers) and ``run.json`` (the feature cache file). The backbone is rebuilt as the run built it: from
its weights file or pretrained weights, or, for a random-init backbone, with the run's seed (train.py
seeds before building it). When the run's feature cache file still exists, the rebuilt backbone's weights
fingerprint is checked against the one the cache was keyed with, so a backbone that differs from
the run's never predicts silently.

The feature transform (``encoders.feature_transform``) is the one the run fitted and was scored with. For
a video run it holds the frame stage (z-score and PCA of the frame features); images go through it, and
then the standardisation and the head, leaving out the temporal stage (HRF, TR averaging), which only a
time series has. A video run written before the transform was saved (no frame stage in head.pt) cannot
predict from images (``predicts_images`` is False) and the image analyses refuse it.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from encoders.backbones import FrozenBackbone, build_backbone
from encoders.feature_cache import weights_fingerprint
from encoders.feature_transform import FeatureTransform
from encoders.model import EncodingModel
from encoders.run_dir import CONFIG, HEAD, RunDir

log = logging.getLogger(__name__)


@dataclass
class TrainedEncoder:
    """A run's encoder: ``model`` (EncodingModel with its frozen backbone), ``config`` (config.yaml as a
    dict), ``info`` (run.json as a dict, {} if absent), ``run_dir``, ``run`` (its RunDir)."""

    model: EncodingModel
    config: dict
    info: dict
    run_dir: Path
    run: RunDir | None = field(default=None, repr=False)

    # -- what it is --------------------------------------------------------
    @property
    def backbone(self) -> FrozenBackbone:
        return self.model.backbone

    @property
    def layers(self) -> list[str]:
        return list(self.backbone.layers)

    @property
    def n_voxels(self) -> int:
        return int(self.model.n_voxels)

    @property
    def n_features(self) -> int:
        return int(self.model.n_features)

    @property
    def transform(self) -> FeatureTransform:
        return self.model.transform

    @property
    def has_frame_stage(self) -> bool:
        """A video run's transform: frame z-score and PCA before the (skipped) temporal stage."""
        return self.transform.has_frame_stage

    @property
    def predicts_images(self) -> bool:
        """Whether images reach the head through the saved transform (False only for video runs written
        before their frame stage was saved with the head)."""
        if self.has_frame_stage:
            return self.transform.n_backbone == self.backbone.n_features
        return self.n_features == self.backbone.n_features

    @property
    def takes_backbone_features(self) -> bool:
        """True when the head reads the backbone's (concatenated, pooled) features directly, each column
        only standardised (no frame stage): its weights are per backbone unit."""
        return not self.has_frame_stage and self.n_features == self.backbone.n_features

    @property
    def feature_slices(self) -> dict[str, slice]:
        """{layer: slice of that layer's columns} in the head's input (FrozenBackbone.feature_slices)."""
        self._require_backbone_features("feature_slices")
        return dict(self.backbone.feature_slices)

    @property
    def device(self) -> torch.device:
        return self.model.feature_mean.device

    # -- prediction --------------------------------------------------------
    @torch.no_grad()
    def standardise(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Per-sample features (n, n_features) (what the run's standardisation was fitted on: the backbone's
        features, or a video run's per-TR features) -> standardised with the run's statistics, float32."""
        x = torch.as_tensor(np.asarray(x, dtype=np.float32) if not torch.is_tensor(x) else x).to(self.device)
        self._check_width(x)
        return self.model.features(x).cpu().numpy()

    @torch.no_grad()
    def head_inputs(self, raw: np.ndarray | torch.Tensor) -> np.ndarray:
        """Backbone features (n, F) -> the head's input (n, n_features) float32 through the run's whole
        image-side transform (a video run's frame stage, then the standardisation)."""
        self._require_images("head_inputs")
        x = torch.as_tensor(np.asarray(raw) if not torch.is_tensor(raw) else raw).to(self.device)
        if x.ndim != 2 or x.shape[1] != self.backbone.n_features:
            raise ValueError(f"{self.run_dir}: the transform takes (n, {self.backbone.n_features}) backbone "
                             f"features, got {tuple(x.shape)}")
        return self.transform.from_backbone(x).cpu().numpy()

    @torch.no_grad()
    def predict_standardised(self, z: np.ndarray | torch.Tensor, batch_size: int = 4096) -> np.ndarray:
        """The head alone: standardised features (n, n_features) -> predictions (n, n_voxels) float32."""
        z = torch.as_tensor(np.asarray(z, dtype=np.float32) if not torch.is_tensor(z) else z)
        self._check_width(z)
        self.model.eval()
        out = [self.model.head(z[i:i + batch_size].to(self.device).float()).float().cpu()
               for i in range(0, len(z), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.n_voxels), np.float32)

    def predict_features(self, x: np.ndarray | torch.Tensor, batch_size: int = 4096) -> np.ndarray:
        """Per-sample features (n, n_features) -> predictions (n, n_voxels) float32 (standardise, then the head)."""
        return self.predict_standardised(self.standardise(x), batch_size)

    @torch.no_grad()
    def image_features(self, images: np.ndarray | Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """Raw backbone features of uint8 images ((n, H, W, 3) or a list of (H, W, 3)) -> (n, n_features) float32.

        Each image goes through the backbone's own transform (resize, crop, normalise).
        """
        self._require_images("image_features")
        out = []
        for start in range(0, len(images), batch_size):
            batch = torch.stack([self.backbone.transform(np.asarray(im)) for im in images[start:start + batch_size]])
            out.append(self.backbone(batch.to(self.device)).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.backbone.n_features), np.float32)

    def image_inputs(self, images: np.ndarray | Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """uint8 images -> the head's input (n, n_features) float32 (backbone, then ``head_inputs``)."""
        return self.head_inputs(self.image_features(images, batch_size))

    def predict_images(self, images: np.ndarray | Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
        """uint8 images -> predicted responses (n, n_voxels) float32: the virtual fMRI of these images."""
        return self.predict_standardised(self.image_inputs(images, batch_size))

    # -- the run's own features --------------------------------------------
    def cached_features(self, ids: np.ndarray) -> np.ndarray | None:
        """Raw features (len(ids), n_features) of stimulus ids from the run's feature cache file, or None
        when the run used no cache, the file is gone or lacks some of the ids."""
        path = (self.run or RunDir(self.run_dir)).feature_cache_file
        if path is None:
            return None
        ids = np.asarray(ids, dtype=np.int64)
        with h5py.File(path, "r") as f:
            stored = f["ids"][:]
            row = {int(i): k for k, i in enumerate(stored)}
            if any(int(i) not in row for i in ids):
                return None
            rows = np.array([row[int(i)] for i in ids], dtype=np.int64)
            unique, inverse = np.unique(rows, return_inverse=True)  # h5py reads increasing rows
            return np.asarray(f["features"][unique], dtype=np.float32)[inverse] if len(ids) else \
                np.zeros((0, f["features"].shape[1]), np.float32)

    def to(self, device: str | torch.device) -> "TrainedEncoder":
        self.model.to(device)
        return self

    # -- checks ------------------------------------------------------------
    def _check_width(self, x: torch.Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"{self.run_dir}: the head takes (n, {self.n_features}) features, got {tuple(x.shape)}")

    def _require_backbone_features(self, what: str) -> None:
        if not self.takes_backbone_features:
            raise ValueError(f"{self.run_dir}: {what} is not available: the head takes {self.n_features} "
                             f"transformed features, not the backbone's {self.backbone.n_features} columns")

    def _require_images(self, what: str) -> None:
        if not self.predicts_images:
            raise ValueError(f"{self.run_dir}: {what} is not available: the head takes {self.n_features} "
                             f"datamodule-transformed features and the run saved no frame stage to map the "
                             f"backbone's {self.backbone.n_features} to them (retrain it to predict from images)")


def _read(run: RunDir) -> tuple[dict, dict]:
    """config.yaml and head.pt of a run, checked; errors name the file at fault."""
    run.require(CONFIG)
    run.require(HEAD)
    config = run.config
    for key in ("backbone", "head"):
        if not isinstance(config.get(key), dict) or "_target_" not in config[key]:
            raise ValueError(f"{run.file(CONFIG)}: no '{key}' section with a _target_")
    state = run.head_state()
    missing = [k for k in ("head", "feature_mean", "feature_std", "n_features", "n_voxels") if k not in state]
    if missing:
        raise ValueError(f"{run.file(HEAD)}: missing keys {missing}")
    return config, state


def rebuild_backbone(config: dict, layers: Sequence[str] | None = None) -> FrozenBackbone:
    """The run's FrozenBackbone from its config dict (config.yaml's ``backbone`` section and ``seed``).

    layers: the layers the run actually used (head.pt's), overriding the config's (which may be null).
    A random-init backbone (pretrained false, no weights_path) is built right after seeding torch with
    the run's seed, as train.py does; the global RNG state is left as it was.
    """
    bb = {k: v for k, v in config["backbone"].items() if not k.startswith("_")}
    if layers is not None:
        bb["layers"] = list(layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(config.get("seed", 0)))
        return build_backbone(**bb)


def _build_head(config: dict, n_features: int, n_voxels: int) -> torch.nn.Module:
    target = config["head"]["_target_"]
    module, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"config.yaml: head _target_ {target!r} cannot be imported ({err})") from err
    kwargs = {k: v for k, v in config["head"].items() if not k.startswith("_")}
    return cls(n_features=n_features, n_voxels=n_voxels, **kwargs)


def _cached_fingerprint(run: RunDir) -> str | None:
    path = run.feature_cache_file
    if path is None:
        return None
    try:
        with h5py.File(path, "r") as f:
            return json.loads(f.attrs["description"]).get("weights")
    except (OSError, KeyError, ValueError):
        return None


def load_trained(run_dir: str | os.PathLike | RunDir, device: str | torch.device = "cpu",
                 check_weights: bool = True) -> TrainedEncoder:
    """Rebuild a run's encoder (frozen backbone + standardisation + trained head) in eval mode.

    run_dir: a run directory written by train.py (a path or a RunDir). check_weights: compare the rebuilt
    backbone with the weights fingerprint of the run's feature cache (when that file exists); ValueError
    on a mismatch. FileNotFoundError / ValueError name the file at fault.
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    run_dir = run.path
    config, state = _read(run)
    backbone = rebuild_backbone(config, state.get("layers"))
    if check_weights:
        expected = _cached_fingerprint(run)
        if expected is not None and weights_fingerprint(backbone.model) != expected:
            raise ValueError(f"{run_dir}: the rebuilt '{backbone.spec.name}' backbone's weights differ from those "
                             f"the run used (feature cache {run.feature_cache_file})")
        if expected is None:
            log.info("%s: no feature cache to check the rebuilt backbone's weights against", run_dir)
    n_features, n_voxels = int(state["n_features"]), int(state["n_voxels"])
    head = _build_head(config, n_features, n_voxels)
    try:
        head.load_state_dict(state["head"])
    except RuntimeError as err:
        raise ValueError(f"{run.file(HEAD)}: head weights do not fit {type(head).__name__} ({err})") from err
    model = EncodingModel(head, n_features, n_voxels, backbone=backbone)
    if state.get("feature_transform") is not None:
        model.transform = FeatureTransform.from_state(state["feature_transform"])
    else:  # a run written before the transform was saved whole: the standardisation alone
        model.transform.set_standardisation(torch.as_tensor(state["feature_mean"]), torch.as_tensor(state["feature_std"]))
    model.eval()
    return TrainedEncoder(model, config, run.info, run_dir, run).to(device)
