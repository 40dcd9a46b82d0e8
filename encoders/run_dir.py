"""The run directory: one type owns its layout, both ways. train.py writes through it; every analysis
and ``encoders.trained.load_trained`` read through it.

    run = RunDir("outputs/runs/<run>")
    run.config, run.info, run.metrics, run.split          # config.yaml, run.json, metrics.json, split.json
    run.voxels().values("test", "r"); run.rois(); run.voxel_xyz   # voxel_metrics.npz
    run.predictions("test").pred                          # predictions.npz
    run.is_time_series                                    # recorded by the datamodule at training time
    run.encoder()                                         # the trained encoder (encoders.trained)
    run.stimuli().image(i)                                # the run's images, opened by its own datamodule class
    run.brain_space(); run.write_maps({"test_r": r})        # the dataset's own space (its datamodule class), maps/
    find_runs("outputs/multirun/<date>")                  # every run at or below a directory

Layout (users and scripts rely on it)::

    config.yaml          the composed config, resolved (the datamodule class is data._target_)
    run.json             provenance: backbone, layers, head, data (the datamodule's description), features
                         (mode, cache file, extraction images/s, and what turned backbone outputs into head
                         inputs), time_series, seed, git commit, package versions, world size, wall time, and
                         ``wandb`` (the W&B run that holds its results: id, project, group, name, mode, dir; or null)
    split.json           {"seed", "subject", "id_base", "train": [ids], "val": [...], "test": [...]}
    metrics.json         {"<split>": {"<m>_mean", "<m>_median", "<m>_mean_reliable" for m in r, r2, nc_r2;
                                      "n_reliable", "n_voxels", "n_nan", "nc_threshold",
                                      "rois": {"<ROI>": {same keys but nc_threshold}}}, ...}
                         (encoders.metrics.summarize: reliable = noise ceiling > nc_threshold %)
    voxel_metrics.npz    per split "<split>_r", "<split>_r2", "<split>_nc" (noise ceiling, % of variance),
                         "<split>_nc_r2"; "voxel_xyz" (n_voxels, k); one bool mask "roi_<name>" per ROI
    predictions.npz      per split "<split>_pred", "<split>_true" (n, n_voxels), "<split>_ids" (n,)
    head.pt              head weights, the fitted feature transform, n_features, n_voxels, backbone, layers
    ridge_cv.npz         closed-form ridge heads: alphas, best_alphas, cv_scores
    checkpoints/last.ckpt, csv/metrics.csv   Lightning's checkpoint and CSV log
    failed.json          a failed sweep job: {"error", "type", "overrides", "traceback"}
    maps/                brain maps in the dataset's own space (write_maps: <name>.nii.gz, {lh,rh}.<name>.mgh or
                         <name>.dscalar.nii, NaN outside the run's voxels) and their pictures <name>.png

A file that exists but cannot be read (truncated, corrupt, unreadable) is one ``RunFileError`` (a ValueError)
naming it, whichever reader found it.

This module reads and writes files only; it imports neither ``analyses`` nor ``datamodules`` (the run's
datamodule class is resolved from its config, as Hydra instantiated it). Every file is written atomically
(``encoders.storage``: a temp file renamed into place; a full disk or read-only folder is one StorageError
naming the file), and metrics.json last, so a directory holding metrics.json is a complete run.
"""
from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import yaml

from encoders.run_record import write_json
from encoders.storage import atomic_write, write_text

CONFIG = "config.yaml"
INFO = "run.json"
SPLIT = "split.json"
METRICS = "metrics.json"
VOXELS = "voxel_metrics.npz"
PREDICTIONS = "predictions.npz"
HEAD = "head.pt"
RIDGE_CV = "ridge_cv.npz"
FAILED = "failed.json"
MAPS = "maps"
LAST_CHECKPOINT = "checkpoints/last.ckpt"
CSV_LOG = "csv/metrics.csv"
SPLITS = ("train", "val", "test")


class RunFileError(ValueError):
    """A run directory's file exists but cannot be read (truncated, corrupt, unreadable); the message names it."""


def read_file(path: Path, parse, kind: str, expect: type | None = None):
    """``parse(path)``; RunFileError naming the file (one line) when it cannot be read or parsed, or when the
    result is not an ``expect`` (e.g. a JSON object). A missing file raises FileNotFoundError as it comes."""
    try:
        value = parse(path)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001  (json, yaml, zip, zlib, pickle, torch: each has its own errors)
        detail = " ".join(str(err).split()) or type(err).__name__
        raise RunFileError(f"{path}: cannot be read as {kind} ({detail}); is it truncated or corrupt?") from None
    if expect is not None and not isinstance(value, expect):
        raise RunFileError(f"{path}: holds a {type(value).__name__}, not the {expect.__name__} a run writes there; "
                           f"is it corrupt?")
    return value


def _json(path: Path):
    return json.loads(path.read_text())


def _yaml(path: Path):
    return yaml.safe_load(path.read_text()) or {}


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


@dataclass
class Predictions:
    """One split's saved predictions: pred, true (n, n_voxels) and the sample ids (n,)."""

    pred: np.ndarray
    true: np.ndarray
    ids: np.ndarray


class VoxelMetrics:
    """voxel_metrics.npz: per-voxel scores per split, voxel coordinates and ROI masks."""

    def __init__(self, path: Path, arrays: dict[str, np.ndarray]):
        self.path, self.arrays = path, arrays

    def __contains__(self, key: str) -> bool:
        return key in self.arrays

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    @property
    def voxel_xyz(self) -> np.ndarray:
        if "voxel_xyz" not in self.arrays:
            raise ValueError(f"{self.path}: no 'voxel_xyz'")
        return self.arrays["voxel_xyz"]

    @property
    def n_voxels(self) -> int:
        return len(self.voxel_xyz)

    def values(self, split: str, metric: str) -> np.ndarray:
        """``<split>_<metric>`` (n_voxels,) float64; ValueError naming the file and the keys it has."""
        key = f"{split}_{metric}"
        if key not in self.arrays:
            raise ValueError(f"{self.path}: no key '{key}' (has {', '.join(sorted(self.arrays))})")
        return self.arrays[key].astype(np.float64)

    def get(self, split: str, metric: str) -> np.ndarray | None:
        """``values(split, metric)``, or None when the file does not have it."""
        key = f"{split}_{metric}"
        return self.arrays[key].astype(np.float64) if key in self.arrays else None

    def rois(self, names=None) -> dict[str, np.ndarray]:
        """{ROI name: bool (n_voxels,)}: every ROI, or the ``names`` given (ValueError naming unknown ones)."""
        masks = {k[4:]: v.astype(bool) for k, v in self.arrays.items() if k.startswith("roi_")}
        if names:
            unknown = [r for r in names if r not in masks]
            if unknown:
                raise ValueError(f"{self.path}: no ROI {unknown} (has {sorted(masks)})")
            masks = {r: masks[r] for r in names}
        return masks


class RunDir:
    """A run directory written by train.py (see the module docstring for its files).

    Reading is lazy and cached; a missing file raises FileNotFoundError naming it (``run.json`` and
    ``config.yaml`` read as {} when absent, as older runs may lack them), one that cannot be read
    RunFileError naming it.
    """

    def __init__(self, path: str | os.PathLike, name: str | None = None):
        self.path = Path(path)
        self._name = name

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    def __eq__(self, other) -> bool:
        return isinstance(other, RunDir) and self.path == other.path

    def __hash__(self) -> int:
        return hash(self.path)

    @property
    def name(self) -> str:
        """The run's display name: given at construction (e.g. its path relative to a sweep), else its folder's."""
        return self._name or self.path.name

    def file(self, name: str) -> Path:
        """The path of one of the run's files (``RunDir.file(METRICS)``)."""
        return self.path / name

    def require(self, name: str, why: str = "") -> Path:
        """The path of a file that must exist; FileNotFoundError naming it otherwise."""
        path = self.path / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found" + (f" ({why})" if why else
                                                             f" (is {self.path} a run directory?)"))
        return path

    @property
    def is_run(self) -> bool:
        """A finished run: metrics.json is written last."""
        return (self.path / METRICS).is_file()

    # ------------------------------------------------------------------ writing (train.py)
    def create(self) -> "RunDir":
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def write_config(self, text: str) -> None:
        """config.yaml: the composed, resolved config as YAML text."""
        self.create()
        write_text(self.path / CONFIG, text)
        self.__dict__.pop("config", None)

    def write_metrics(self, metrics: dict) -> None:
        """metrics.json (written last: a run directory with metrics.json is complete)."""
        write_json(self.path / METRICS, metrics)
        self.__dict__.pop("metrics", None)

    def write_voxel_metrics(self, per_split: dict[str, dict[str, np.ndarray]], voxel_xyz: np.ndarray,
                            rois: dict[str, np.ndarray]) -> None:
        """per_split: {split: {"r", "r2", "nc", "nc_r2"} each (n_voxels,)} -> voxel_metrics.npz."""
        arrays = {f"{split}_{k}": np.asarray(v, dtype=np.float32) for split, d in per_split.items()
                  for k, v in d.items()}
        arrays["voxel_xyz"] = np.asarray(voxel_xyz)
        arrays.update({f"roi_{name}": np.asarray(mask, dtype=bool) for name, mask in rois.items()})
        _save_npz(self.path / VOXELS, arrays)
        self._voxels = None

    def write_split(self, seed: int, subject, split_ids: dict[str, np.ndarray], id_base: int = 0) -> None:
        write_json(self.path / SPLIT, {"seed": int(seed), "subject": subject, "id_base": int(id_base),
                                       **{s: ids for s, ids in split_ids.items()}})
        self.__dict__.pop("split", None)

    def write_predictions(self, pred: dict[str, np.ndarray], true: dict[str, np.ndarray],
                          ids: dict[str, np.ndarray]) -> None:
        """predictions.npz: per split the predictions (float32), the measured responses and the ids."""
        _save_npz(self.path / PREDICTIONS, {**{f"{s}_pred": np.asarray(p, np.float32) for s, p in pred.items()},
                                            **{f"{s}_true": true[s] for s in pred},
                                            **{f"{s}_ids": ids[s] for s in pred}})

    def write_head(self, state: dict) -> None:
        """head.pt: {"head": state_dict, "feature_transform": its state, "n_features", "n_voxels",
        "backbone", "layers"} (torch.save)."""
        import torch

        atomic_write(self.path / HEAD, lambda f: torch.save(state, f))

    def write_ridge_cv(self, alphas: np.ndarray, best_alphas: np.ndarray, cv_scores: np.ndarray, **record) -> None:
        """ridge_cv.npz: the alpha grid, each voxel's alpha, the CV scores, and the fit's ``record``
        (RidgeCV.cv_record(): its folds and grid-edge counts)."""
        _save_npz(self.path / RIDGE_CV, {"alphas": alphas, "best_alphas": best_alphas,
                                         "cv_scores": np.asarray(cv_scores, np.float32), **record})

    def write_info(self, info: dict) -> None:
        """run.json: the run's provenance."""
        write_json(self.path / INFO, info)
        self.__dict__.pop("info", None)

    def record_wandb(self, record: dict) -> None:
        """Set run.json's ``wandb`` entry (the W&B run of this encoder, logged after training, e.g. by the
        report), keeping the rest of run.json."""
        info = dict(self.info)
        info["wandb"] = record
        write_json(self.path / INFO, info)
        self.__dict__.pop("info", None)

    def write_failure(self, record: dict) -> None:
        """failed.json: {"error": one line, "type", "overrides", "traceback"}."""
        self.create()
        write_json(self.path / FAILED, record)

    def clear_failure(self) -> None:
        """Remove the failed.json of an earlier failed attempt in this directory."""
        (self.path / FAILED).unlink(missing_ok=True)

    # ------------------------------------------------------------------ reading
    @cached_property
    def config(self) -> dict:
        """config.yaml as a dict ({} when absent)."""
        path = self.path / CONFIG
        return read_file(path, _yaml, "YAML", dict) if path.is_file() else {}

    @cached_property
    def info(self) -> dict:
        """run.json as a dict ({} when absent)."""
        path = self.path / INFO
        return read_file(path, _json, "JSON", dict) if path.is_file() else {}

    @cached_property
    def metrics(self) -> dict:
        return read_file(self.require(METRICS), _json, "JSON", dict)

    @cached_property
    def split(self) -> dict:
        """split.json: {"seed", "subject", "id_base", "train", "val", "test"}."""
        return read_file(self.require(SPLIT), _json, "JSON", dict)

    def split_ids(self, split: str) -> np.ndarray:
        """The 0-based sample ids of a split (int64), from split.json; ValueError for an unknown split."""
        if split not in self.split:
            raise ValueError(f"{self.path / SPLIT}: no split '{split}'")
        return np.asarray(self.split[split], dtype=np.int64) - int(self.split.get("id_base", 0))

    _voxels: VoxelMetrics | None = None

    def voxels(self) -> VoxelMetrics:
        """voxel_metrics.npz (read once)."""
        if self._voxels is None:
            path = self.require(VOXELS, "every run directory has one")
            self._voxels = VoxelMetrics(path, read_file(path, _npz, "a .npz archive"))
        return self._voxels

    @property
    def voxel_xyz(self) -> np.ndarray:
        return self.voxels().voxel_xyz

    def rois(self, names=None) -> dict[str, np.ndarray]:
        return self.voxels().rois(names)

    def predictions(self, split: str = "test") -> Predictions:
        """predictions.npz's arrays of one split; errors name the file or the missing keys."""
        path = self.require(PREDICTIONS, "the run must be written with save_predictions=true")
        keys = (f"{split}_pred", f"{split}_true", f"{split}_ids")

        def read(p: Path) -> dict[str, np.ndarray]:
            with np.load(p) as f:
                return {k: f[k] for k in keys if k in f}
        arrays = read_file(path, read, "a .npz archive")
        missing = [k for k in keys if k not in arrays]
        if missing:
            raise ValueError(f"{path}: no {missing} (split '{split}')")
        return Predictions(*(arrays[k] for k in keys))

    def head_state(self) -> dict:
        """head.pt (torch.load on the CPU)."""
        import torch

        return read_file(self.require(HEAD), lambda p: torch.load(p, map_location="cpu", weights_only=False),
                         "a torch file", dict)

    @property
    def csv_log(self) -> Path:
        """Lightning's CSV log of the run (may not exist)."""
        return self.path / CSV_LOG

    def learning_curve(self) -> dict[str, np.ndarray] | None:
        """Per-epoch curves from the run's Lightning CSV log (csv/metrics.csv), or None without one.

        Returns {"epoch": (e,), "train/loss": (e,), "val/loss": (e,), "val/r_mean": (e,)}, NaN where an
        epoch did not log a key. Closed-form heads log one validation row (a single "epoch").
        """
        import csv

        if not self.csv_log.exists():
            return None
        keys = ("train/loss", "val/loss", "val/r_mean")

        def read(path: Path) -> dict[int, dict[str, float]]:
            per_epoch: dict[int, dict[str, float]] = {}
            with open(path, newline="") as f:
                for row in csv.DictReader(f):
                    if not row.get("epoch"):
                        continue
                    entry = per_epoch.setdefault(int(float(row["epoch"])), {})
                    for key in keys:
                        if row.get(key) not in (None, ""):
                            entry[key] = float(row[key])
            return per_epoch
        per_epoch = read_file(self.csv_log, read, "Lightning's CSV log")
        epochs = sorted(e for e, v in per_epoch.items() if v)
        if not epochs:
            return None
        out = {"epoch": np.array(epochs)}
        for key in keys:
            out[key] = np.array([per_epoch[e].get(key, np.nan) for e in epochs])
        return out

    @property
    def feature_cache_file(self) -> Path | None:
        """The feature cache file the run read its features from, if it used one and it still exists."""
        path = (self.info.get("features") or {}).get("cache_file")
        return Path(path) if path and Path(path).is_file() else None

    # ------------------------------------------------------------------ what the run is
    @property
    def backbone(self) -> str:
        return str(self.info.get("backbone", "?"))

    @property
    def head(self) -> str:
        return str(self.info.get("head", "?"))

    @property
    def dataset(self) -> str:
        return str(self.data.get("dataset", "?"))

    @property
    def subject(self):
        return self.data.get("subject", "?")

    @property
    def wandb(self) -> dict | None:
        """run.json's ``wandb``: {"id", "project", "group", "name", "job_type", "mode", "dir"} of the W&B run that
        holds this encoder's results, or None."""
        return self.info.get("wandb") or None

    @property
    def data(self) -> dict:
        """run.json's ``data``: what the datamodule recorded about itself (``describe()``)."""
        return self.info.get("data", {})

    @property
    def data_config(self) -> dict:
        """config.yaml's ``data`` section (the datamodule's arguments, with its ``_target_``)."""
        return dict(self.config.get("data") or {})

    @cached_property
    def datamodule_class(self) -> type:
        """The datamodule class the run was trained with (config.yaml ``data._target_``)."""
        target = self.data_config.get("_target_")
        if not target:
            raise ValueError(f"{self.path / CONFIG}: no data section with a _target_")
        module, _, name = str(target).rpartition(".")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as err:
            raise ValueError(f"{self.path / CONFIG}: data._target_ {target!r} cannot be imported ({err})") from None

    @property
    def is_time_series(self) -> bool:
        """Whether the samples are a time series (video TRs): recorded in run.json by train.py from the
        datamodule; for runs written before that, the datamodule class's ``time_series`` attribute."""
        if "time_series" in self.info:
            return bool(self.info["time_series"])
        return bool(getattr(self.datamodule_class, "time_series", False))

    # ------------------------------------------------------------------ what the run hands out
    def datamodule_arguments(self) -> dict:
        """config.yaml's ``data`` section as the datamodule's keyword arguments (without ``_target_`` and the
        generator parameters train.py consumes: ``synthetic``, ``generator``)."""
        return {k: v for k, v in self.data_config.items() if not k.startswith("_") and k not in ("synthetic", "generator")}

    def datamodule(self):
        """The run's datamodule rebuilt from its config and set up (its data read again, e.g. for refits)."""
        root = self.data_config.get("root")
        if root is not None and not Path(root).exists():
            raise FileNotFoundError(f"{root}: the run's data root is gone")
        dm = self.datamodule_class(**self.datamodule_arguments())
        dm.setup()
        return dm

    def stimuli(self):
        """The run's images by sample id (a stimulus source: ``image(id)`` -> uint8 (H, W, 3), ``len()``),
        opened by the run's own datamodule class from what the run recorded (no responses are read).
        ValueError (one line) when the class cannot open stimuli or the files are gone."""
        cls = self.datamodule_class
        if not hasattr(cls, "open_stimuli"):
            raise ValueError(f"{self.path}: its datamodule {cls.__name__} serves no images")
        return cls.open_stimuli(self.data_config, self.data)

    def brain_space(self):
        """The dataset's own space of the run's voxels, asked of its datamodule class from what the run recorded
        (``datamodules.brain_space``: VolumeSpace, SurfaceSpace or CiftiSpace; no responses are read).
        ValueError (one line) when the class has none or the file that defines the space is gone."""
        cls = self.datamodule_class
        if not hasattr(cls, "brain_space"):
            raise ValueError(f"{self.path}: its datamodule {cls.__name__} has no brain space to write maps in")
        return cls.brain_space(self.data_config, self.data)

    @property
    def maps_dir(self) -> Path:
        """``<run>/maps/``: the run's brain maps in its dataset's space (see ``write_maps``)."""
        return self.path / MAPS

    def write_maps(self, maps: dict[str, np.ndarray], space=None, folder: str | os.PathLike | None = None) -> list[Path]:
        """Write per-voxel maps {name: (n_voxels,)} in the run's space under ``maps/`` (or ``folder``):
        ``<name>.nii.gz`` (volumes), ``{lh,rh}.<name>.mgh`` (surfaces) or ``<name>.dscalar.nii`` (CIFTI), NaN
        outside the run's voxels, each file written atomically. Returns the files written."""
        return write_maps(folder or self.maps_dir, space or self.brain_space(), self.voxel_xyz, maps)

    def read_map(self, name: str, space=None, folder: str | os.PathLike | None = None) -> np.ndarray:
        """A map written by ``write_maps``, read back at the run's voxels: (n_voxels,) float32."""
        return (space or self.brain_space()).decode(Path(folder or self.maps_dir), name, self.voxel_xyz)

    def map_files(self) -> list[Path]:
        """The files under ``maps/``, sorted (none when the folder is absent)."""
        return sorted(p for p in self.maps_dir.iterdir() if p.is_file()) if self.maps_dir.is_dir() else []

    def ground_truth(self) -> dict | None:
        """The planted ground truth at the run's voxels, from a synthetic dataset's datamodule
        (``SyntheticDataModule.ground_truth``); None for any other data."""
        method = getattr(self.datamodule_class, "ground_truth", None)
        return None if method is None else method(self.data_config, self.data, self.voxel_xyz)

    def category_images(self, parent: str | os.PathLike, n_per_category: int, seed: int = 0) -> Path | None:
        """A folder of freshly drawn images per category of the run's dataset (synthetic datasets only,
        ``SyntheticDataModule.category_images``), under ``parent``; None for any other data."""
        method = getattr(self.datamodule_class, "category_images", None)
        return None if method is None else method(self.data_config, self.data, parent, n_per_category, seed)

    @property
    def has_single_trials(self) -> bool:
        """Whether the run's datamodule can re-read single trials at any of its voxels (NSD layout)."""
        return hasattr(self.datamodule_class, "single_trials")

    def single_trials(self, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every trial of the run's sessions at its voxels ``columns`` (indices into its voxels), read and
        preprocessed by the run's datamodule as the run's data were: (stimulus ids (n_trials,) in
        presentation order, values (n_trials, len(columns)))."""
        if not self.has_single_trials:
            raise ValueError(f"{self.path}: its datamodule {self.datamodule_class.__name__} cannot read single trials")
        return self.datamodule_class.single_trials(self.data_config, self.data, self.voxel_xyz[np.asarray(columns)])

    def encoder(self, device: str = "cpu", check_weights: bool = True):
        """The trained encoder (``encoders.trained.TrainedEncoder``): frozen backbone, feature transform, head."""
        from encoders.trained import load_trained

        return load_trained(self, device=device, check_weights=check_weights)


def write_maps(folder: str | os.PathLike, space, voxel_xyz: np.ndarray, maps: dict[str, np.ndarray]) -> list[Path]:
    """Per-voxel maps {name: (n_voxels,)} at ``voxel_xyz`` in ``space`` (a ``datamodules.brain_space`` space,
    whose ``encode`` gives each file's bytes) -> files under ``folder``, each written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, values in maps.items():
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"map name {name!r}: expected a plain file name stem")
        for file_name, data in space.encode(name, values, voxel_xyz).items():
            atomic_write(folder / file_name, lambda f, data=data: f.write(data))
            written.append(folder / file_name)
    return written


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed to a temporary file, then renamed into place (``encoders.storage.atomic_write``)."""
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


def find_runs(directory: str | os.PathLike) -> list[RunDir]:
    """Run directories (holding metrics.json) at or below ``directory``, sorted by path, each named by its
    path relative to ``directory`` (its folder name when it is ``directory`` itself)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory")
    return [RunDir(p.parent, None if p.parent == directory else str(p.parent.relative_to(directory)))
            for p in sorted(directory.rglob(METRICS))]


def require_runs(directory: str | os.PathLike) -> list[RunDir]:
    """``find_runs(directory)``, or FileNotFoundError naming the directory when it holds no run."""
    runs = find_runs(directory)
    if not runs:
        raise FileNotFoundError(f"{directory}: no run directories (with metrics.json) found")
    return runs


def find_failed(directory: str | os.PathLike) -> list[dict]:
    """Sweep jobs that failed, at or below ``directory``: the failed.json train.py writes in a failed job's
    directory, {"error": one line, "type": exception class, "overrides": [...], "traceback": text},
    each with "dir" added; sorted by path. An unreadable failed.json is reported as such; one beside a
    metrics.json (a later attempt succeeded) is not a failure."""
    failed = []
    for path in sorted(Path(directory).rglob(FAILED)):
        if (path.parent / METRICS).exists():
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            record = {"error": f"unreadable failed.json: {err}", "type": "?", "overrides": []}
        failed.append({**record, "dir": path.parent})
    return failed
