"""Train and test one encoding model: compose config -> data -> frozen backbone -> head -> run directory.

    python train.py backbone=alexnet head=linear data=nsd data.root=/path/to/nsd data.subject=1
    python train.py -m backbone=tiny,alexnet experiment=demo
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("WANDB_SILENT", "true")
# conf/hydra/launcher/{joblib,submitit_slurm}.yaml set this project's values for the launcher plugins'
# configs of the same name, which Hydra 1.3 still validates them against (and warns about).
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")

import hydra  # noqa: E402
import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.errors import InstantiationException  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from lightning.pytorch.utilities.rank_zero import rank_zero_only  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict, read_write  # noqa: E402

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


def wandb_group(single_run_group: str) -> str:
    """The W&B group: a multirun's sweep directory name (all its jobs in one group), else the given one."""
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN and hydra_cfg.sweep.dir:
            return Path(str(hydra_cfg.sweep.dir)).name
    return single_run_group


OmegaConf.register_new_resolver("wandb_offline", wandb_offline, replace=True)
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
    """Instantiate the datamodule (generating the embedded synthetic dataset first if asked)."""
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    synthetic = data_cfg.pop("synthetic", None)
    if synthetic:
        ensure_synthetic(data_cfg["root"], **synthetic)
    generator = data_cfg.pop("generator", None)
    if generator:  # {_target_: a function (root, **params) that writes the dataset if absent, ...}
        instantiate(generator, data_cfg["root"])
    dm = instantiate(data_cfg)
    if getattr(dm, "time_series", False) and (cfg.get("head") or {}).get("shuffle_folds", False):
        raise ConfigError(f"head.shuffle_folds=true would shuffle the TRs of data={dm.name} (a time series) "
                          f"across cross-validation folds; set head.shuffle_folds=false")
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
    if hasattr(dm, "prepare_features"):  # time series (video): the datamodule turns frame features into TRs
        if mode == "online":
            raise ConfigError(f"features=online is not available for data={dm.name}: its samples are TRs, not images")
        cache = FeatureCache(cfg.feature_cache_dir) if mode == "cached" else None

        def extract(ids, source, make_loader):
            if cache is None:
                return extract_features(backbone, make_loader(ids), device, description="frame features"), "computed"
            result = cache.load_or_build(backbone, ids, source, make_loader, device)
            return result.features, result.status

        features, dm_info = dm.prepare_features(backbone, extract)
        info.update(dm_info, cache_dir=str(cfg.feature_cache_dir) if cache else None)
        return features, info
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


def write_run(run_dir: Path, cfg: DictConfig, dm, model: EncodingModel, features: dict, backbone,
              started: float, feature_info: dict) -> dict:
    """Write metrics.json, voxel_metrics.npz, split.json, run.json, head.pt, predictions."""
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
        "python": platform.python_version(), "world_size": int(model.trainer.world_size) if model._trainer else 1,
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
    writer = rank_zero_only.rank == 0  # under DDP only global rank 0 writes the run directory
    resume_from = resume_checkpoint(cfg, run_dir)  # before config.yaml is rewritten: it is compared
    if writer:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if str(cfg.features) not in FEATURE_MODES:
        raise ConfigError(f"features must be one of {FEATURE_MODES}, got {cfg.features!r}")
    check_precision(cfg)
    backbone = instantiate(cfg.backbone)  # before the data: a weights problem shows in seconds
    dm = build_datamodule(cfg)
    features, feature_info = prepare_features(cfg, backbone, dm, extraction_device(cfg))
    n_features = int(features["train"].shape[1])  # the backbone's width, or fewer after a datamodule's PCA
    head = instantiate(cfg.head)(n_features=n_features, n_voxels=dm.n_voxels)
    model = EncodingModel(head, n_features, dm.n_voxels, backbone=backbone,
                          optimizer=instantiate(cfg.optimizer) if cfg.get("optimizer") else None,
                          scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
                          seed=int(cfg.seed))
    model.set_feature_stats(features["train"].mean(0), features["train"].std(0))
    trainer = build_trainer(cfg)
    if getattr(head, "closed_form", False):
        # Closed form: solved on the training split (alphas by CV inside it), no epochs.
        head.fit(model.features(features["train"]), dm.targets("train"))
        trainer.validate(model, datamodule=dm, verbose=False)
        trainer.test(model, datamodule=dm, verbose=False)
        trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    else:
        if resume_from and writer:
            keep_earlier_logs(trainer)
        trainer.fit(model, datamodule=dm, ckpt_path=resume_from)
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback is not None else ""
        trainer.test(model, datamodule=dm, ckpt_path=best or None, verbose=False)
    if not trainer.is_global_zero:
        return TrainResult(None, model, dm, run_dir)
    metrics = write_run(run_dir, cfg, dm, model.cpu(), features, backbone, started, feature_info)
    (run_dir / FAILED_FILE).unlink(missing_ok=True)  # an earlier failed attempt in this directory
    log.info("test: r %.3f  R2 %.3f  NC-R2 %.3f  (%d voxels) -> %s", metrics["test"]["r_mean"],
             metrics["test"]["r2_mean"], metrics["test"]["nc_r2_mean"], metrics["test"]["n_voxels"], run_dir)
    run_analysis_jobs(cfg, run_dir)
    return TrainResult(metrics, model, dm, run_dir)


# Lightning precisions that keep the head in float32: only the backbone autocasts (EncodingModel).
PRECISIONS = ("32", "32-true", "64", "64-true", "bf16-mixed", "16-mixed")


def check_precision(cfg: DictConfig) -> None:
    """trainer.precision must keep the head, loss and metrics in float32; 16-mixed needs a GPU."""
    precision = str(cfg.trainer.get("precision", "32"))
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision} is not supported (one of {', '.join(PRECISIONS)}): "
                          "the head, its loss and the metrics stay float32, only the backbone autocasts")
    if precision == "16-mixed" and extraction_device(cfg) == "cpu":
        raise ConfigError("trainer.precision=16-mixed needs a GPU; use precision=bf16-mixed on a CPU")


def backbone_autocast(cfg: DictConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast of trainer.precision on ``device`` (bf16-mixed / 16-mixed), else a no-op."""
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(str(cfg.trainer.get("precision", "32")))
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs (plain dicts)."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


# Keys that may change between an interrupted run and its restart.
RESUME_IGNORED_KEYS = ("logger", "resume", "analyze")


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """``<run_dir>/checkpoints/last.ckpt`` if an earlier attempt of this run left one and ``resume`` is on.

    A restarted command (same ``hydra.run.dir``, or the same multirun ``hydra.sweep.dir``) goes on from
    the last completed epoch. The earlier attempt must have had the same config (its config.yaml;
    logger, resume and analyze aside): continuing another model's checkpoint would be silently wrong.
    """
    last = run_dir / "checkpoints" / "last.ckpt"
    if not cfg.get("resume", True) or not last.exists():
        return None
    previous = run_dir / "config.yaml"
    if previous.exists():
        old = OmegaConf.to_container(OmegaConf.load(previous))
        new = OmegaConf.to_container(cfg, resolve=True)
        for key in RESUME_IGNORED_KEYS:
            old.pop(key, None), new.pop(key, None)
        differ = config_differences(old, new)
        if differ:
            raise ConfigError(f"{run_dir}: holds a run with another config ({', '.join(differ[:5])} differ); "
                              "use another hydra.run.dir, or resume=false to start afresh there")
    log.info("resuming from %s", last)
    return str(last)


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
    subprocess), in the W&B group of the training run; its output goes to ``analyze_<name>.log``.
    A failing analysis is reported, and does not fail the training run."""
    names = cfg.get("analyze") or []
    names = [names] if isinstance(names, str) else list(names)
    env = dict(os.environ)
    wandb = (cfg.get("logger") or {}).get("wandb")
    if wandb is not None and wandb.get("group"):
        env["WANDB_RUN_GROUP"] = str(wandb.group)
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


# A failed sweep job leaves this file in its directory: {"error": one line, "type": exception class,
# "overrides": the job's overrides, "traceback": text}. analyze.py analysis=summary lists them.
FAILED_FILE = "failed.json"


def record_failure(run_dir: Path, err: BaseException, overrides: list[str]) -> None:
    """Write failed.json (global rank 0 only) and log the failure."""
    log.error("job failed (%s): %s: %s", " ".join(overrides), type(err).__name__, err)
    if rank_zero_only.rank != 0:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / FAILED_FILE, {
        "error": str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__,
        "type": type(err).__name__, "overrides": overrides,
        "traceback": "".join(traceback.format_exception(err))})


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


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """One job. In a multirun a failing job records failed.json and returns None, so the other jobs go on."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        with ddp_job(cfg, run_dir):
            metrics = train(cfg, run_dir).metrics
    except Exception as err:
        cause = user_error(err)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            record_failure(run_dir, cause or err, list(hydra_cfg.overrides.task))
            return None
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)
    if metrics is None:  # a DDP rank > 0: rank 0 reports
        return None
    split, _, key = str(cfg.optimized_metric).partition("/")
    return metrics.get(split, {}).get(key)


if __name__ == "__main__":
    main()
