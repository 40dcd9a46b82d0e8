"""Train and test one encoding model: compose config -> data -> frozen backbone -> head -> run directory.

    python train.py backbone=alexnet head=linear data=nsd data.root=/path/to/nsd data.subject=1
    python train.py -m backbone=tiny,alexnet experiment=demo
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("WANDB_SILENT", "true")

import hydra  # noqa: E402
import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.errors import InstantiationException  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from datamodules.errors import DataError  # noqa: E402
from datamodules.nsd import SPLITS  # noqa: E402
from datamodules.synthetic import ensure_synthetic  # noqa: E402
from encoders.extract import extract_features  # noqa: E402
from encoders.feature_cache import FeatureCache  # noqa: E402
from encoders.metrics import nc_normalised_r2, noise_ceiling, noise_ceiling_k, summarize, VoxelScores  # noqa: E402
from encoders.model import EncodingModel  # noqa: E402
from encoders.run_record import git_commit, package_versions, write_json, write_voxel_metrics  # noqa: E402
from encoders.weights import WeightsError  # noqa: E402

log = logging.getLogger("brainprobe.train")


class ConfigError(ValueError):
    """A config value train.py cannot use; the message names the key."""


USER_ERRORS = (DataError, WeightsError, ConfigError)


def wandb_offline() -> bool:
    """W&B runs offline unless a key is set or WANDB_MODE asks for online: never blocks on the network."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode:
        return mode in ("offline", "disabled", "dryrun")
    return not os.environ.get("WANDB_API_KEY")


OmegaConf.register_new_resolver("wandb_offline", wandb_offline, replace=True)


def build_datamodule(cfg: DictConfig):
    """Instantiate the datamodule (generating the embedded synthetic dataset first if asked)."""
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    synthetic = data_cfg.pop("synthetic", None)
    if synthetic:
        ensure_synthetic(data_cfg["root"], **synthetic)
    dm = instantiate(data_cfg)
    dm.setup()
    return dm


def extraction_device(cfg: DictConfig) -> str:
    wants_cpu = str(cfg.trainer.get("accelerator", "auto")) == "cpu"
    return "cuda" if torch.cuda.is_available() and not wants_cpu else "cpu"


FEATURE_MODES = ("cached", "precompute", "online")


def prepare_features(cfg: DictConfig, backbone, dm, device: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Features per split, by ``cfg.features``; returns (features, what the run records about them).

    cached: read from the on-disk cache (extracting once per key); precompute: one in-memory pass;
    online: the datamodule serves images and the backbone runs in every step (only the train
    features are extracted here, for the standardisation statistics and closed-form heads).
    """
    mode = str(cfg.features)
    dm.set_transform(backbone.transform)
    info: dict = {"mode": mode}
    if mode == "cached":
        ids = np.unique(np.concatenate([dm.split_ids[s] for s in SPLITS]))
        cache = FeatureCache(cfg.feature_cache_dir)
        result = cache.load_or_build(backbone, ids, dm.stimulus_source(), dm.images_loader, device)
        row = {int(i): k for k, i in enumerate(ids)}
        features = {s: result.features[[row[int(i)] for i in dm.split_ids[s]]] for s in SPLITS}
        info.update(cache_key=result.key, cache_file=str(result.path), cache_status=result.status)
    elif mode == "precompute":
        features = {s: extract_features(backbone, dm.image_loader(s), device, description=f"features {s}")
                    for s in SPLITS}
    else:
        features = {"train": extract_features(backbone, dm.image_loader("train"), device, description="features train")}
    if mode != "online":
        dm.set_features(features)
    return features, info


@torch.no_grad()
def split_scores(model: EncodingModel, dm, split: str, features: torch.Tensor | None,
                 batch: int = 1024) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Whole-split per-voxel r and R² of ``model`` (from features, or images when there are none)."""
    model.eval()
    targets = dm.targets(split)
    scores = VoxelScores(targets.shape[1])
    if features is not None:
        inputs = (features[start:start + batch] for start in range(0, len(features), batch))
    else:
        inputs = (b["x"] for b in dm.image_loader(split))
    preds, start = [], 0
    for x in inputs:
        pred = model(x.to(model.device)).cpu()
        scores.update(pred, torch.from_numpy(targets[start:start + len(pred)]))
        preds.append(pred)
        start += len(pred)
    return {k: v.numpy() for k, v in scores.compute().items()}, torch.cat(preds).numpy()


def build_trainer(cfg: DictConfig) -> L.Trainer:
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)


def write_run(run_dir: Path, cfg: DictConfig, dm, model: EncodingModel, features: dict, backbone,
              started: float, feature_info: dict) -> dict:
    """Write metrics.json, voxel_metrics.npz, split.json, run.json, head.pt, predictions."""
    per_split, metrics, predictions = {}, {}, {}
    for split in ("val", "test"):
        scores, pred = split_scores(model, dm, split, features.get(split))
        nc = noise_ceiling(dm.ncsnr(), noise_ceiling_k(dm.n_repeats(split)))
        nc_r2 = nc_normalised_r2(scores["r2"], nc)
        per_split[split] = {"r": scores["r"], "r2": scores["r2"], "nc": nc, "nc_r2": nc_r2}
        metrics[split] = summarize(scores["r"], scores["r2"], nc_r2, dm.rois)
        predictions[split] = pred
    write_json(run_dir / "metrics.json", metrics)
    write_voxel_metrics(run_dir / "voxel_metrics.npz", per_split, dm.data.voxel_xyz, dm.rois)
    write_json(run_dir / "split.json", {"seed": int(cfg.seed), "subject": dm.subject, "id_base": 0,
                                        **{s: ids for s, ids in dm.split_ids.items()}})
    if cfg.get("save_predictions", True):
        np.savez_compressed(run_dir / "predictions.npz",
                            **{f"{s}_pred": p.astype(np.float32) for s, p in predictions.items()},
                            **{f"{s}_true": dm.targets(s) for s in predictions},
                            **{f"{s}_ids": dm.split_ids[s] for s in predictions})
    torch.save({"head": model.head.state_dict(), "feature_mean": model.feature_mean.cpu(),
                "feature_std": model.feature_std.cpu(), "n_features": model.n_features,
                "n_voxels": model.n_voxels, "backbone": backbone.spec.name, "layers": backbone.layers},
               run_dir / "head.pt")
    if hasattr(model.head, "estimator") and hasattr(model.head.estimator, "cv_scores_"):
        est = model.head.estimator
        np.savez_compressed(run_dir / "ridge_cv.npz", alphas=est.alphas, best_alphas=est.best_alphas_,
                            cv_scores=est.cv_scores_.astype(np.float32))
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    write_json(run_dir / "run.json", {
        "backbone": backbone.spec.name, "layers": backbone.layers, "n_features": backbone.n_features,
        "head": choices.get("head", type(model.head).__name__), "data": dm.describe(), "features": feature_info,
        "seed": int(cfg.seed), "git_commit": git_commit(Path(__file__).parent), "versions": package_versions(),
        "wall_time_s": time.time() - started, "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
    })
    return metrics


@dataclass
class TrainResult:
    """What one training run produced: metrics.json's content, the fitted model and its data."""

    metrics: dict
    model: EncodingModel
    datamodule: object
    run_dir: Path


def train(cfg: DictConfig, run_dir: Path) -> TrainResult:
    """Fit and test one encoder as configured and write the run directory."""
    started = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if str(cfg.features) not in FEATURE_MODES:
        raise ConfigError(f"features must be one of {FEATURE_MODES}, got {cfg.features!r}")
    backbone = instantiate(cfg.backbone)  # before the data: a weights problem shows in seconds
    dm = build_datamodule(cfg)
    features, feature_info = prepare_features(cfg, backbone, dm, extraction_device(cfg))
    head = instantiate(cfg.head)(n_features=backbone.n_features, n_voxels=dm.n_voxels)
    model = EncodingModel(head, backbone.n_features, dm.n_voxels, backbone=backbone,
                          optimizer=instantiate(cfg.optimizer) if cfg.get("optimizer") else None,
                          scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None)
    model.set_feature_stats(features["train"].mean(0), features["train"].std(0))
    trainer = build_trainer(cfg)
    if getattr(head, "closed_form", False):
        # Closed form: solved on the training split (alphas by CV inside it), no epochs.
        head.fit(model.features(features["train"]), dm.targets("train"))
        trainer.validate(model, datamodule=dm, verbose=False)
        trainer.test(model, datamodule=dm, verbose=False)
        trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    else:
        trainer.fit(model, datamodule=dm)
        has_best = trainer.checkpoint_callback is not None and trainer.checkpoint_callback.best_model_path
        trainer.test(model, datamodule=dm, ckpt_path="best" if has_best else None, verbose=False)
    metrics = write_run(run_dir, cfg, dm, model.cpu(), features, backbone, started, feature_info)
    log.info("test: r %.3f  R2 %.3f  NC-R2 %.3f  (%d voxels) -> %s", metrics["test"]["r_mean"],
             metrics["test"]["r2_mean"], metrics["test"]["nc_r2_mean"], metrics["test"]["n_voxels"], run_dir)
    return TrainResult(metrics, model, dm, run_dir)


def user_error(err: BaseException) -> BaseException | None:
    """The user-facing error behind err, if any: a DataError/WeightsError/ConfigError, or a
    ValueError raised while Hydra instantiated a config (a bad value such as an unknown layer)."""
    wrapped = False
    while err is not None:
        if isinstance(err, USER_ERRORS) or (wrapped and isinstance(err, ValueError)):
            return err
        wrapped = wrapped or isinstance(err, InstantiationException)
        err = err.__cause__ or (err.__context__ if isinstance(err, InstantiationException) else None)
    return None


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg, Path(HydraConfig.get().runtime.output_dir)).metrics
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)
    split, _, key = str(cfg.optimized_metric).partition("/")
    return metrics.get(split, {}).get(key)


if __name__ == "__main__":
    main()
