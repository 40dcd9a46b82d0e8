"""Train and test one encoding model: compose config -> data -> frozen backbone -> head -> run directory.

    python train.py backbone=alexnet head=linear data=nsd data.root=/path/to/nsd data.subject=1
    python train.py -m backbone=tiny,alexnet experiment=demo
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("WANDB_SILENT", "true")
# A log file that can no longer be written (disk full) must not print a traceback per log call.
logging.raiseExceptions = False
# conf/hydra/launcher/{joblib,submitit_slurm}.yaml set this project's values for the launcher plugins'
# configs of the same name, which Hydra 1.3 still validates them against (and warns about).
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")

import hydra  # noqa: E402
import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.errors import InstantiationException  # noqa: E402
from hydra.experimental.callback import Callback  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from lightning.pytorch.utilities.rank_zero import rank_zero_only  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict, read_write  # noqa: E402

from analyses.jobs.maps import write_training_maps  # noqa: E402  (brain maps at the end of a run)
from datamodules.errors import DataError  # noqa: E402
from datamodules.nsd import SPLITS  # noqa: E402
from datamodules.synthetic import ensure_synthetic  # noqa: E402
from encoders.config_checks import (ConfigError, check_config, check_data, check_head_training_set,  # noqa: E402
                                    resolved_config)
from encoders.extract import (  # noqa: E402
    ExtractionStats, extract_features, loader_transform, pixel_record,
)
from encoders.feature_cache import FeatureCache  # noqa: E402
from encoders.feature_transform import scaling_options  # noqa: E402
from encoders.hydra_errors import one_line_hydra_errors  # noqa: E402
from encoders.metrics import NC_THRESHOLD, headline, nc_normalised_r2, noise_ceiling, noise_ceiling_k, summarize, VoxelScores  # noqa: E402,E501
from encoders.model import EncodingModel  # noqa: E402
from encoders.resume import RunDirInUse, check_run_dir, holds_run, resume_checkpoint  # noqa: E402
from encoders.run_dir import CONFIG, FAILED, LAST_CHECKPOINT, RunDir, RunFileError, find_failed  # noqa: E402
from encoders.run_record import git_commit, package_versions  # noqa: E402
from encoders.storage import StorageError, is_storage_failure, reason, require_writable_dir  # noqa: E402
from encoders.wandb_mode import WandbModeError, wandb_mode  # noqa: E402  (the one W&B-mode rule, shared with the analyses)
from encoders.wandb_run import default_group, run_name  # noqa: E402  (W&B runs: encoders/wandb_run.py, wandb_logger.py)
from encoders.weights import WeightsError  # noqa: E402

log = logging.getLogger("brainprobe.train")


USER_ERRORS = (DataError, WeightsError, ConfigError, StorageError, RunFileError)


def wandb_group(dataset: str, subject) -> str:
    """The default W&B group (``logger.wandb.group``): the experiment's name when one is selected, else a
    multirun's sweep directory name (all its jobs in one group), else ``<dataset>-subj<N>``."""
    experiment = sweep = None
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        experiment = (hydra_cfg.runtime.get("choices") or {}).get("experiment")
        if hydra_cfg.mode == RunMode.MULTIRUN and hydra_cfg.sweep.dir:
            sweep = Path(str(hydra_cfg.sweep.dir)).name
    return default_group(experiment, sweep, dataset, subject)


OmegaConf.register_new_resolver("wandb_group", wandb_group, replace=True)


def shuffle_folds_for(datamodule_target: str) -> bool:
    """Default of a ridge head's ``shuffle_folds`` for the datamodule class ``datamodule_target``: False
    (contiguous cross-validation folds) for a time series, whose neighbouring samples are not independent."""
    module, _, name = str(datamodule_target).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return True  # an unknown datamodule fails with its own message when it is instantiated
    return not getattr(cls, "time_series", False)


OmegaConf.register_new_resolver("shuffle_folds_for", shuffle_folds_for, replace=True)


def build_datamodule(cfg: DictConfig):
    """Instantiate the datamodule (``check_data``: its arguments checked), generate the embedded synthetic
    dataset if asked, and read the data (``setup``)."""
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    dm = check_data(data_cfg, OmegaConf.to_container(cfg.head, resolve=True) if cfg.get("head") else None)
    synthetic = data_cfg.pop("synthetic", None)
    if synthetic:
        ensure_synthetic(data_cfg["root"], **synthetic)
    generator = data_cfg.pop("generator", None)
    if generator:  # {_target_: a function (root, **params) that writes the dataset if absent, ...}
        instantiate(generator, data_cfg["root"])
    dm.setup()
    return dm


def extraction_device(cfg: DictConfig) -> str:
    """cpu, or this process's GPU (cuda:LOCAL_RANK: each DDP rank extracts on its own GPU)."""
    wants_cpu = str(cfg.trainer.get("accelerator", "auto")) == "cpu"
    if not torch.cuda.is_available() or wants_cpu:
        return "cpu"
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    return f"cuda:{local_rank % torch.cuda.device_count()}"


def prepare_features(cfg: DictConfig, backbone, dm, device: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Features per split, by ``cfg.features``; returns (features, what the run records about them).

    cached: read from the on-disk cache (extracting once per key); precompute: one in-memory pass;
    online: the datamodule serves images and the backbone runs in every step (only the train
    features are extracted here, for the standardisation statistics and closed-form heads).
    """
    mode = str(cfg.features)
    # Where the resize/crop/normalise runs during extraction: batched on the device (the loader only decodes)
    # or per image in the loader. features=online feeds the trainer's image loaders: always per image.
    preprocess_on = str(cfg.get("preprocess_on", "device")) if mode != "online" else "cpu"
    dm.set_transform(loader_transform(backbone, preprocess_on))
    info: dict = {"mode": mode, "preprocess_on": preprocess_on, "pixels": pixel_record(backbone, device, preprocess_on)}
    stats = ExtractionStats()  # the images this run extracted and their wall time (run.json, W&B summary)
    if hasattr(dm, "prepare_features"):  # time series (video): the datamodule turns frame features into TRs
        if mode == "online":
            raise ConfigError(f"features=online is not available for data={dm.name}: its samples are TRs, not images")
        cache = FeatureCache(cfg.feature_cache_dir) if mode == "cached" else None

        def extract(ids, source, make_loader):
            if cache is None:
                return extract_features(backbone, make_loader(ids), device, description="frame features",
                                        stats=stats, preprocess_on=preprocess_on), "computed"
            result = cache.load_or_build(backbone, ids, source, make_loader, device, stats=stats,
                                         preprocess_on=preprocess_on)
            return result.features, result.status

        features, dm_info = dm.prepare_features(backbone, extract, loader_transform(backbone, preprocess_on))
        dm.set_transform(backbone.transform)  # any later image served goes through the per-image transform
        info.update(dm_info, cache_dir=str(cfg.feature_cache_dir) if cache else None, extraction=extraction_record(stats))
        return features, info
    if mode == "cached":
        ids = np.unique(np.concatenate([dm.split_ids[s] for s in SPLITS]))
        cache = FeatureCache(cfg.feature_cache_dir)
        result = cache.load_or_build(backbone, ids, dm.stimulus_source(), dm.images_loader, device, stats=stats,
                                     preprocess_on=preprocess_on)
        row = {int(i): k for k, i in enumerate(ids)}
        features = {s: result.features[[row[int(i)] for i in dm.split_ids[s]]] for s in SPLITS}
        info.update(cache_key=result.key, cache_file=str(result.path), cache_status=result.status)
    elif mode == "precompute":
        features = {s: extract_features(backbone, dm.image_loader(s), device, description=f"features {s}",
                                        stats=stats, preprocess_on=preprocess_on) for s in SPLITS}
    else:
        features = {"train": extract_features(backbone, dm.image_loader("train"), device, description="features train",
                                              stats=stats, preprocess_on=preprocess_on)}
    dm.set_transform(backbone.transform)  # any later image served goes through the per-image transform
    if mode != "online":
        dm.set_features(features)
    info["extraction"] = extraction_record(stats)
    return features, info


def extraction_record(stats: ExtractionStats) -> dict | None:
    """run.json's features.extraction: {"images", "seconds", "images_per_s"}; None when nothing was extracted."""
    if not stats.images:
        return None
    return {"images": stats.images, "seconds": round(stats.seconds, 3), "images_per_s": stats.images_per_s,
            "waiting_for_images_s": round(stats.waiting_s, 3)}


@torch.no_grad()
def split_scores(model: EncodingModel, dm, split: str, features: torch.Tensor | None,
                 batch: int = 1024) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Whole-split per-voxel r and R² of ``model`` (from features, or images when there are none)."""
    model.eval()
    targets = dm.targets(split)
    scores = VoxelScores(targets.shape[1], sync_on_compute=False)  # this process has the whole split
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


def write_run(run: RunDir, cfg: DictConfig, dm, model: EncodingModel, features: dict, backbone,
              started: float, feature_info: dict) -> dict:
    """Write the run's files through ``run`` (metrics, per-voxel scores, split, predictions, head, run.json)."""
    per_split, metrics, predictions = {}, {}, {}
    for split in ("val", "test"):
        with backbone_autocast(cfg, model.device):  # as in the trainer's loops (only the backbone autocasts)
            scores, pred = split_scores(model, dm, split, features.get(split))
        if split == "test" and model.test_result is not None:
            # The trainer's test loop: under DDP summed over every rank's share of the split.
            scores = {k: model.test_result[k].numpy() for k in ("r", "r2")}
        nc = noise_ceiling(dm.ncsnr(), noise_ceiling_k(dm.n_repeats(split)))
        nc_r2 = nc_normalised_r2(scores["r2"], nc)
        per_split[split] = {"r": scores["r"], "r2": scores["r2"], "nc": nc, "nc_r2": nc_r2}
        metrics[split] = summarize(scores["r"], scores["r2"], nc_r2, dm.rois, nc=nc, nc_threshold=nc_threshold(cfg))
        predictions[split] = pred
    run.write_voxel_metrics(per_split, dm.data.voxel_xyz, dm.rois)
    run.write_split(cfg.seed, dm.subject, dm.split_ids)
    if cfg.get("save_predictions", True):
        run.write_predictions(predictions, {s: dm.targets(s) for s in predictions},
                              {s: dm.split_ids[s] for s in predictions})
    run.write_head({"head": model.head.state_dict(), "feature_transform": model.transform.state(),
                    "feature_mean": model.feature_mean.cpu(), "feature_std": model.feature_std.cpu(),
                    "n_features": model.n_features, "n_voxels": model.n_voxels, "backbone": backbone.spec.name,
                    "layers": backbone.layers})
    if hasattr(model.head, "estimator") and hasattr(model.head.estimator, "cv_scores_"):
        est = model.head.estimator
        run.write_ridge_cv(est.alphas, est.best_alphas_, est.cv_scores_, **est.cv_record())
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    run.write_info({
        "backbone": backbone.spec.name, "layers": backbone.layers, "n_features": backbone.n_features,
        "backbone_spec": backbone.describe(),  # family, model, layers -> modules + pooling, the exact preprocessing
        "head": choices.get("head", type(model.head).__name__), "data": dm.describe(),
        "features": {**feature_info, "transform": model.transform.describe({s: features.get(s) for s in ("val", "test")})},
        "time_series": bool(getattr(dm, "time_series", False)),
        "seed": int(cfg.seed), "git_commit": git_commit(Path(__file__).parent), "versions": package_versions(),
        "python": platform.python_version(), "world_size": int(model.trainer.world_size) if model._trainer else 1,
        "wall_time_s": time.time() - started, "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "wandb": wandb_record(model.trainer if model._trainer else None),
    })
    run.write_metrics(metrics)  # last: a run directory with metrics.json is complete
    return metrics


def wandb_loggers(trainer: L.Trainer | None) -> list:
    from encoders.wandb_logger import TrainingLogger

    return [lg for lg in (trainer.loggers if trainer is not None else []) if isinstance(lg, TrainingLogger)]


def start_wandb(trainer: L.Trainer, cfg: DictConfig, model: EncodingModel, dm) -> None:
    """logger=wandb: start its W&B run (global rank 0) with the resolved config, nested, plus ``encoder``: what
    was built (backbone, its layers, head, dataset, subject, n_features, n_voxels), and a readable name."""
    loggers = wandb_loggers(trainer)
    if not loggers:
        return
    config = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "hydra"}
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    encoder = {"backbone": model.backbone.spec.name, "layers": list(model.backbone.layers),
               "head": choices.get("head", type(model.head).__name__), "dataset": dm.name, "subject": dm.subject,
               "n_features": int(model.n_features), "n_voxels": int(model.n_voxels)}
    config["encoder"] = encoder
    name = run_name(encoder["backbone"], encoder["layers"], encoder["head"], encoder["dataset"], encoder["subject"])
    for logger in loggers:
        logger.start(config, name)


def wandb_record(trainer: L.Trainer | None) -> dict | None:
    """run.json's ``wandb``: the training run's W&B id, project, group, name, mode and directory (or None)."""
    records = [lg.record() for lg in wandb_loggers(trainer)]
    return next((r for r in records if r), None)


def finish_wandb(trainer: L.Trainer, run_dir: Path) -> None:
    """Log the run's results to its W&B run and end it; an offline run prints the ``wandb sync`` line."""
    for logger in wandb_loggers(trainer):
        line = logger.finish_run(run_dir)
        if line:
            log.info("W&B run saved offline; upload it with: %s", line)


@dataclass
class TrainResult:
    """What one training run produced: metrics.json's content, the fitted model and its data."""

    metrics: dict
    model: EncodingModel
    datamodule: object
    run_dir: Path


def start_run(cfg: DictConfig, run_dir: Path) -> tuple[RunDir, str | None]:
    """The run directory with this config (global rank 0 writes it) and the checkpoint to resume from, once
    the whole config is checked (``encoders.config_checks``): a mistake is one ConfigError naming the key,
    before the backbone is built or any data is read, and before anything is written."""
    config = resolved_config(cfg)  # a value left ??? or a ${...} that does not resolve
    resume_from = resume_checkpoint(config, run_dir)  # refuses a directory holding another config's run
    check_config(config)
    nc_threshold(cfg)
    if "wandb" in (cfg.get("logger") or {}):
        try:
            wandb_mode()  # an unknown WANDB_MODE is one line now, not a traceback after feature extraction
        except WandbModeError as err:
            raise ConfigError(str(err)) from None
    try:
        scaling_options(cfg.get("feature_scaling"))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    run = RunDir(run_dir)
    if rank_zero_only.rank == 0:  # under DDP only global rank 0 writes the run directory
        run.write_config(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    return run, resume_from


def build_model(cfg: DictConfig) -> tuple[EncodingModel, object, dict, dict]:
    """Instantiate the backbone, the datamodule (and its features) and the head into an EncodingModel whose
    feature transform is fitted on the training features: (model, datamodule, features, feature info)."""
    backbone = instantiate(cfg.backbone)  # before the data: a weights problem shows in seconds
    dm = build_datamodule(cfg)
    check_head_training_set(cfg.head, dm.split_ids["train"])  # e.g. more CV folds than images: before extraction
    features, feature_info = prepare_features(cfg, backbone, dm, extraction_device(cfg))
    n_features = int(features["train"].shape[1])  # the backbone's width, or fewer after a datamodule's PCA
    head = instantiate(cfg.head)(n_features=n_features, n_voxels=dm.n_voxels)
    model = EncodingModel(head, n_features, dm.n_voxels, backbone=backbone,
                          optimizer=instantiate(cfg.optimizer) if cfg.get("optimizer") else None,
                          scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
                          seed=int(cfg.seed))
    reducer = getattr(dm, "frame_reducer", None)
    if reducer is not None:  # a video run: its frame z-score and PCA become part of the saved transform
        model.transform.set_frame_stage(reducer, temporal={
            "tr": getattr(dm, "tr", None), **{k: feature_info.get(k) for k in ("frame_rate", "hrf", "timing", "detrend_order")}})
    blocks = backbone.feature_slices if n_features == backbone.n_features else None  # per layer, unless a PCA mixed them
    model.transform.fit(features["train"], blocks=blocks, **scaling_options(cfg.get("feature_scaling")))
    return model, dm, features, feature_info


def fit_and_test(cfg: DictConfig, model: EncodingModel, dm, features: dict, run: RunDir,
                 resume_from: str | None) -> L.Trainer:
    """Fit the head (closed form on the training split, or epochs, resumed from a checkpoint) and test it."""
    trainer = build_trainer(cfg)
    start_wandb(trainer, cfg, model, dm)
    if getattr(model.head, "closed_form", False):
        # Closed form: solved on the training split (alphas by CV inside it), no epochs.
        # On the trainer's device (a GPU under accelerator=gpu; under DDP each rank's own), not the model's (the CPU).
        model.head.fit(model.features(features["train"]), dm.targets("train"), groups=dm.split_ids["train"],
                       device=trainer.strategy.root_device)
        trainer.validate(model, datamodule=dm, verbose=False)
        trainer.test(model, datamodule=dm, verbose=False)
        trainer.save_checkpoint(run.file(LAST_CHECKPOINT))
    else:
        if resume_from and rank_zero_only.rank == 0:
            keep_earlier_logs(trainer)
        trainer.fit(model, datamodule=dm, ckpt_path=resume_from)
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback is not None else ""
        trainer.test(model, datamodule=dm, ckpt_path=best or None, verbose=False)
    return trainer


def train(cfg: DictConfig, run_dir: Path) -> TrainResult:
    """Fit and test one encoder as configured and write the run directory: compose (``cfg``) -> instantiate
    -> fit/test -> write."""
    started = time.time()
    run, resume_from = start_run(cfg, run_dir)
    model, dm, features, feature_info = build_model(cfg)
    trainer = fit_and_test(cfg, model, dm, features, run, resume_from)
    if not trainer.is_global_zero:
        return TrainResult(None, model, dm, run_dir)
    metrics = write_run(run, cfg, dm, model.cpu(), features, model.backbone, started, feature_info)
    run.clear_failure()  # an earlier failed attempt in this directory
    write_training_maps(run, cfg.get("maps"))  # <run>/maps/: brain maps in the dataset's space (+ pictures)
    log.info("test: %s -> %s", headline(metrics["test"]), run_dir)
    finish_wandb(trainer, run_dir)  # after the maps: their pictures go into the W&B run
    run_analysis_jobs(cfg, run_dir)
    return TrainResult(metrics, model, dm, run_dir)


def nc_threshold(cfg: DictConfig) -> float:
    """metrics.nc_threshold (% of variance, 0 <= t < 100): the noise ceiling above which a voxel is "reliable"."""
    value = OmegaConf.select(cfg, "metrics.nc_threshold", default=NC_THRESHOLD)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"metrics.nc_threshold must be a number (% of variance), got {value!r}") from None
    if not 0 <= value < 100:
        raise ConfigError(f"metrics.nc_threshold must be in [0, 100) (% of variance), got {value:g}")
    return value


def backbone_autocast(cfg: DictConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast of trainer.precision on ``device`` (bf16-mixed / 16-mixed), else a no-op."""
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(cfg.trainer.get("precision", "32")))
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def keep_earlier_logs(trainer: L.Trainer) -> None:
    """Lightning's CSVLogger deletes the metrics.csv it finds: a resumed run first renames the earlier
    attempt's to metrics.attempt<N>.csv beside it (the new metrics.csv starts at the resumed epoch)."""
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            earlier = Path(logger.log_dir) / "metrics.csv"
            if earlier.exists():
                n = 1 + len(list(earlier.parent.glob("metrics.attempt*.csv")))
                earlier.rename(earlier.with_name(f"metrics.attempt{n}.csv"))


def run_analysis_jobs(cfg: DictConfig, run_dir: Path) -> None:
    """``+analyze=[name, ...]``: each analysis runs on this run as a job of its own (analyze.py in a
    subprocess); one that logs to W&B does so in the training run's group (run.json's ``wandb``), as a
    ``job_type=analysis`` run that refers to it. Its output goes to ``analyze_<name>.log``.
    A failing analysis is reported, and does not fail the training run."""
    names = cfg.get("analyze") or []
    names = [names] if isinstance(names, str) else list(names)
    env = dict(os.environ)
    for name in names:
        out_file = run_dir / f"analyze_{name}.log"
        with open(out_file, "w") as out:
            proc = subprocess.run([sys.executable, str(Path(__file__).with_name("analyze.py")), f"analysis={name}",
                                   f"run_dir={run_dir}", f"hydra.run.dir={run_dir}"],
                                  stdout=out, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).parent)
        if proc.returncode:
            log.warning("analysis %s failed (exit %d): see %s", name, proc.returncode, out_file)
        else:
            log.info("analysis %s -> %s", name, out_file)


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


def record_failure(run_dir: Path, err: BaseException, overrides: list[str], console: bool = True) -> None:
    """Write failed.json (global rank 0 only) and log the failure with its traceback (console=False: to the
    log files only, e.g. train.log, when the console gets its own one-line message). A directory that holds
    a finished run (metrics.json) is left as it is; a failure to write the record is only logged."""
    text = f"job failed ({' '.join(overrides)}): {type(err).__name__}: {err}"
    if console:
        log.error(text)
    else:
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, text, None, (type(err), err, err.__traceback__))
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
    run = RunDir(run_dir)
    if rank_zero_only.rank != 0 or run.is_run:
        return
    try:
        run.write_failure({
            "error": str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__,
            "type": type(err).__name__, "overrides": overrides,
            "traceback": "".join(traceback.format_exception(err))})
    except OSError as write_err:
        log.warning("could not record the failure in %s: %s", run.file(FAILED), write_err)


def storage_failure(err: BaseException, run_dir: Path) -> StorageError | None:
    """A StorageError naming the path, for an OSError (anywhere in err's chain) saying that the file system
    refused (disk full, read-only, no permission) where no code on the way named the file: its file, or
    the run directory when there is none or it is a temp file (a library staging a file elsewhere)."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and is_storage_failure(seen):
            name = seen.filename and Path(os.fsdecode(seen.filename))
            if name and (name.is_relative_to(run_dir) or name.parent != Path(tempfile.gettempdir())):
                return StorageError(f"{name}: {reason(seen)}")
            return StorageError(f"{run_dir}: {reason(seen)} while writing the run{f' (at {name})' if name else ''}")
        seen = seen.__cause__ or seen.__context__
    return None


def job_config_refusal(config: DictConfig, output_dir: Path) -> str | None:
    """Why a job of the composed ``config`` (with its ``hydra`` node) must not run in ``output_dir``: the
    directory holds a run of another config (``encoders.resume``), or its recorded config cannot be read;
    None when it may run there (also when the config cannot be resolved: the job reports that itself)."""
    if OmegaConf.select(config, "hydra.runtime") is None:
        return None  # not a config Hydra composed
    job = copy.deepcopy(config)
    with read_write(job.hydra.runtime), open_dict(job.hydra.runtime):
        job.hydra.runtime.output_dir = str(output_dir)  # as Hydra's run_job sets it, for ${hydra:...}
    saved = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(job)
    try:
        with read_write(job), open_dict(job):
            del job["hydra"]
        check_run_dir(resolved_config(job), output_dir)
    except RunDirInUse as err:
        return str(err)
    except ConfigError:
        return None
    finally:
        HydraConfig.instance().cfg = saved
    return None


class RunDirChecks(Callback):
    """Hydra callbacks of train.py (conf/train.yaml ``hydra.callbacks``).

    Before Hydra writes anything: an output folder (hydra.run.dir, or a multirun's hydra.sweep.dir) that
    cannot be written is one ``error:`` line, exit 2; so is a single run's directory that holds a run of
    another config (``encoders.resume``: nothing in it is touched, .hydra/ and train.log included).
    A multirun job whose directory holds another config's run is refused too (the job says so in one line
    and writes nothing there): Hydra has already rewritten that job's .hydra/ files when a job starts, so
    they are put back as they were when the sweep started. After a multirun: if jobs of this sweep failed
    (their failed.json, written or rewritten during it) or were refused, one line saying how many, exit 1.
    """

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        run_dir = Path(os.path.abspath(str(config.hydra.run.dir)))
        refusal = job_config_refusal(config, run_dir)
        if refusal:
            print(f"error: {refusal}", file=sys.stderr)
            sys.exit(2)
        self._require(run_dir, "run directory")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep = self._require(config.hydra.sweep.dir, "sweep directory")
        self.earlier = {p: p.stat().st_mtime_ns for p in sweep.rglob(FAILED)}
        self.refused: list[tuple[str, str]] = []
        self.hydra_files: dict[str, dict[str, bytes]] = {}  # the .hydra/ files of the runs already in the sweep
        subdir = config.hydra.output_subdir
        if subdir:
            for job_dir in {p.parent for p in sweep.rglob(CONFIG) if p.parent.name != str(subdir)}:
                if holds_run(job_dir):
                    files = [f for f in (job_dir / str(subdir)).glob("*") if f.is_file()]
                    self.hydra_files[os.path.abspath(job_dir)] = {f.name: f.read_bytes() for f in files}

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return  # a single run was checked before Hydra wrote anything
        job_dir = Path(str(config.hydra.runtime.output_dir))
        refusal = job_config_refusal(config, job_dir)
        if not refusal:
            return
        getattr(self, "refused", []).append((job_dir.name, refusal))
        subdir, saved = config.hydra.output_subdir, getattr(self, "hydra_files", {}).get(os.path.abspath(job_dir))
        if subdir and saved is not None:  # Hydra rewrote them just before this call: put back what was there
            for f in (job_dir / str(subdir)).glob("*"):
                if f.name in saved:
                    f.write_bytes(saved[f.name])
                elif f.is_file():
                    f.unlink()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(str(config.hydra.sweep.dir))
        earlier = getattr(self, "earlier", {})
        failed = [f for f in find_failed(sweep)
                  if earlier.get(f["dir"] / FAILED) != (f["dir"] / FAILED).stat().st_mtime_ns]
        refused = getattr(self, "refused", [])
        said = []
        if failed:
            first = failed[0]
            said.append(f"{len(failed)} job(s) of the sweep failed (first: {first['dir'].name}: {first['type']}: "
                        f"{first['error']}); see failed.json in their folders, or: python analyze.py "
                        f"analysis=summary sweep_dir={sweep}")
        if refused:
            said.append(f"{len(refused)} job(s) of the sweep were refused (first: {refused[0][0]}: {refused[0][1]})")
        if said:
            print(f"error: {'; '.join(said)}", file=sys.stderr)
            sys.exit(1)

    @staticmethod
    def _require(directory, what: str) -> Path:
        try:
            return require_writable_dir(str(directory), what)
        except StorageError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)


HYDRA_VALUE_FLAGS = ("-cp", "-cn", "-cd", "--config-path", "--config-name", "--config-dir")


def spawns_ddp_ranks(cfg: DictConfig) -> bool:
    """Whether this job uses a DDP strategy whose other ranks Lightning may start by re-running the script."""
    strategy = cfg.trainer.get("strategy")
    name = strategy if isinstance(strategy, str) else (strategy or {}).get("_target_", "")
    return "ddp" in str(name).lower() and "spawn" not in str(name).lower()


@contextlib.contextmanager
def ddp_job(cfg: DictConfig, run_dir: Path):
    """Make one job safe for Lightning's ``ddp`` strategy, which starts ranks > 0 by re-running sys.argv
    with ``hydra.run.dir=<HydraConfig run.dir>``. Under a multirun that would re-launch the whole sweep
    in every child, and run.dir (with its ``${now:}``) is not this job's directory: for the job's
    duration argv holds only this job's overrides and run.dir its directory, so every rank works in one
    directory; afterwards argv and the environment (MASTER_PORT, ...) are restored and the process
    group is destroyed, so the next job of a sweep starts clean."""
    if not spawns_ddp_ranks(cfg) or not HydraConfig.initialized():
        yield
        return
    hydra_cfg = HydraConfig.get()
    if "joblib" in str(hydra_cfg.launcher.get("_target_", "")):
        raise ConfigError("trainer.strategy=ddp cannot run inside hydra/launcher=joblib (a worker process is not a "
                          "script Lightning can re-run); use the basic launcher or submitit_slurm")
    saved_argv, saved_env = list(sys.argv), dict(os.environ)
    flags, args = [], iter(saved_argv[1:])
    for arg in args:
        if arg in HYDRA_VALUE_FLAGS:
            flags += [arg, next(args, "")]
        elif arg.startswith(tuple(f"{f}=" for f in HYDRA_VALUE_FLAGS if f.startswith("--"))):
            flags.append(arg)
    searchpath = [o for o in hydra_cfg.overrides.hydra if o.startswith("hydra.searchpath")]  # where configs are
    sys.argv = [saved_argv[0], *flags, *searchpath, *hydra_cfg.overrides.task]
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = str(run_dir)
    try:
        yield
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def guarded(job, hydra_cfg, run_dir: Path):
    """The one failure wrapper around a training job (``job()``): a failure is recorded in the job's
    failed.json and its traceback in the log (``record_failure``); in a multirun the sweep then goes on
    (returns None; RunDirChecks makes the sweep exit 1 at the end); otherwise a user error (``user_error``,
    or a storage failure) is one ``error:`` line and exit code 2, and anything else is raised."""
    try:
        return job()
    except RunDirInUse as err:  # the directory holds another run: nothing is written there, not even a record
        print(f"error: {err}", file=sys.stderr)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return None
        sys.exit(2)
    except Exception as err:
        cause = user_error(err) or storage_failure(err, run_dir)
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        record_failure(run_dir, cause or err, list(hydra_cfg.overrides.task), console=multirun or cause is None)
        if multirun:
            return None
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """One job. A failing job records failed.json and the traceback in its log; in a multirun it returns None,
    so the other jobs go on (RunDirChecks makes the sweep exit 1 at the end); a single run prints one line."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)

    def job():
        with ddp_job(cfg, run_dir):
            return train(cfg, run_dir).metrics

    metrics = guarded(job, hydra_cfg, run_dir)
    if metrics is None:  # a failed multirun job, or a DDP rank > 0 (rank 0 reports)
        return None
    split, _, key = str(cfg.optimized_metric).partition("/")
    return metrics.get(split, {}).get(key)


if __name__ == "__main__":
    with one_line_hydra_errors():  # head=lineer, head.foo=1, ...: one error line naming the choices, exit 2
        main()
