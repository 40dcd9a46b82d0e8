"""Check a training config before anything heavy runs: each mistake is one ConfigError naming the key.

    config = resolved_config(cfg)        # the composed DictConfig as plain values; ??? and broken ${...} named
    check_config(config)                 # every group, in seconds: no backbone built, no data read
    check_head_training_set(config["head"], train_ids)   # once the split is known, before any features

What ``check_config`` checks, in this order:

* every node with a ``_target_`` (data, backbone, head, optimizer, scheduler, trainer, callbacks, logger and
  what they nest, such as ``head.cv``): the target imports and takes every option the node gives;
* ``features`` and the trainer's precision;
* the head's option values: its class's ``check_options`` (``encoders.heads``);
* the datamodule's arguments: the datamodule is instantiated, which checks them and reads nothing
  (``data.synthetic`` / ``data.generator`` are train.py's, not the datamodule's); a ridge head that would
  shuffle a time series across its folds;
* the optimizer and scheduler, built once on a dummy parameter (torch's own checks: a negative lr, ...);
* the trainer's options, by building a throwaway ``lightning.Trainer`` without loggers or callbacks
  (devices that do not exist, an unknown strategy, ...), and the callbacks, instantiated.

Backbone names, layers and pooling are checked by the backbone registry when the backbone is built, the
first step after these checks. ``check_head_training_set`` runs the head's ``check_training_set`` (the ridge's
cross-validation folds against the training split's stimulus ids) after the split and before extraction.
The functions work on plain dicts (as ``OmegaConf.to_container`` gives them), so they need no Hydra run.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import logging
import os
import re
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from encoders.extract import PREPROCESS_ON


class ConfigError(ValueError):
    """A config value train.py cannot use; the message names the key."""


FEATURE_MODES = ("cached", "precompute", "online")
# Lightning precisions that keep the head in float32: only the backbone autocasts (EncodingModel).
PRECISIONS = ("32", "32-true", "64", "64-true", "bf16-mixed", "16-mixed")
# Keys of the data group that train.py's build_datamodule consumes (dataset generators), not datamodule arguments.
DATA_BUILD_KEYS = ("synthetic", "generator")
# Keys Hydra's instantiate reads itself.
INSTANTIATE_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


def one_line(err: BaseException) -> str:
    """An error's message on one line (whitespace runs collapsed), or its class name when it has none."""
    return " ".join(str(err).split()) or type(err).__name__


def resolved_config(cfg: DictConfig | Mapping) -> dict:
    """The config as plain values (``OmegaConf.to_container(resolve=True)``, without a ``hydra`` node);
    ConfigError naming the first key left ``???`` or whose ``${...}`` cannot be resolved."""
    if not isinstance(cfg, DictConfig):
        return {k: v for k, v in cfg.items() if k != "hydra"}
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra."))
    if missing:
        raise ConfigError(f"{missing[0]} needs a value (it is ??? in the config): give {missing[0]}=...")
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
        plain.pop("hydra", None)
        return plain
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        message = str(getattr(err, "msg", None) or err).strip().splitlines()[0]
        raise ConfigError(f"{key + ': ' if key else ''}cannot be resolved ({message})") from None


def check_config(config: Mapping) -> None:
    """Check every group of a resolved training config (see the module docstring); ConfigError naming the key."""
    check_targets(config)
    if str(config.get("features", "cached")) not in FEATURE_MODES:
        raise ConfigError(f"features must be one of {', '.join(FEATURE_MODES)}, got {config.get('features')!r}")
    if str(config.get("preprocess_on", "device")) not in PREPROCESS_ON:
        raise ConfigError(f"preprocess_on must be one of {', '.join(PREPROCESS_ON)}, got {config.get('preprocess_on')!r}")
    check_precision(config)
    head = config.get("head")
    if head:
        check_head(head)
    if config.get("data"):
        check_data(config["data"], head)
    check_optimizer(config.get("optimizer"), config.get("scheduler"))
    if config.get("trainer"):
        check_trainer(config["trainer"], config.get("callbacks"))


# ----------------------------------------------------------------------------- targets and their options
def check_targets(node, path: str = "") -> None:
    """Every ``_target_`` at or below ``node`` imports, and takes every key its node gives (unless it accepts
    ``**kwargs``); ConfigError naming the key and listing the options the target takes."""
    if isinstance(node, Mapping):
        if "_target_" in node:
            _check_target(node, path)
        for key, value in node.items():
            if not str(key).startswith("_"):
                check_targets(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, (list, tuple)):
        for k, value in enumerate(node):
            check_targets(value, f"{path}[{k}]")


def _check_target(node: Mapping, path: str) -> None:
    target = node["_target_"]
    obj = import_target(str(target), f"{path + '.' if path else ''}_target_")
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return  # no signature to check against (a builtin): its call reports what it refuses
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    skip = DATA_BUILD_KEYS if path == "data" else ()
    unknown = [k for k in node if k not in INSTANTIATE_KEYS and k not in params and k not in skip]
    if unknown:
        partial = bool(node.get("_partial_"))  # arguments without defaults are filled in by the code
        options = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                   and not (partial and p.default is p.empty)]
        close = difflib.get_close_matches(str(unknown[0]), options, n=1)
        listed = (f"did you mean {close[0]}? " if close else "") + (
            "it takes none" if not options else f"its options: {', '.join(options)}" if len(options) <= 16
            else f"see {target}'s arguments")
        raise ConfigError(f"{path + '.' if path else ''}{unknown[0]}: not an option of {target} ({listed})")


def import_target(target: str, key: str = "_target_"):
    """The object a ``_target_`` names (``module.attribute``, nested attributes allowed); ConfigError naming
    ``key`` when it cannot be imported."""
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and module_name.startswith(err.name):
                continue  # not a module: try a shorter prefix
            raise ConfigError(f"{key}={target}: cannot be imported ({one_line(err)})") from None
        except Exception as err:  # noqa: BLE001  (the module fails on import: say so, on one line)
            raise ConfigError(f"{key}={target}: cannot be imported ({type(err).__name__}: {one_line(err)})") from None
        try:
            for name in parts[cut:]:
                obj = getattr(obj, name)
        except AttributeError:
            raise ConfigError(f"{key}={target}: {module_name} has no {'.'.join(parts[cut:])}") from None
        return obj
    raise ConfigError(f"{key}={target}: cannot be imported (no module {parts[0]!r})")


def _instantiate(node: Mapping, what: str, **kwargs):
    """instantiate(node); ConfigError naming the key (``what``, or the nested key Hydra reports) with the
    one-line cause when it fails. A cause that names its own key (``data.val_fraction must ...``) is kept."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = one_line(err.__cause__ or err)
        if cause.startswith(f"{what}.") or cause.startswith(f"{what} "):
            raise ConfigError(cause) from None
        nested = re.search(r"full_key: (\S+)", str(err))
        if nested and nested.group(1) != what:
            raise ConfigError(f"{what}.{nested.group(1)}: {cause}") from None
        raise ConfigError(f"{what} ({node.get('_target_')}): {cause}") from None


# ----------------------------------------------------------------------------- groups
def check_precision(config: Mapping) -> None:
    """trainer.precision must keep the head, loss and metrics in float32; 16-mixed needs a GPU."""
    trainer = config.get("trainer") or {}
    precision = str(trainer.get("precision", "32"))
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision} is not supported (one of {', '.join(PRECISIONS)}): "
                          "the head, its loss and the metrics stay float32, only the backbone autocasts")
    wants_cpu = str(trainer.get("accelerator", "auto")) == "cpu"
    if precision == "16-mixed" and (wants_cpu or not torch.cuda.is_available()):
        raise ConfigError("trainer.precision=16-mixed needs a GPU; use precision=bf16-mixed on a CPU")


def head_partial(head: Mapping):
    """The head config built as a partial (nested configs such as a splitter ``cv`` instantiated)."""
    if not head.get("_partial_"):
        raise ConfigError("head._partial_ must be true: the head's sizes (n_features, n_voxels) are filled in "
                          "at run time")
    return _instantiate(head, "head")


def check_head(head: Mapping) -> None:
    """The head class's ``check_options(prefix="head.", **options)``, if it has one."""
    built = head_partial(head)
    check = getattr(built.func, "check_options", None)
    if check is not None:
        try:
            check(**built.keywords, prefix="head.")
        except ValueError as err:
            raise ConfigError(one_line(err)) from None


def check_head_training_set(head: Mapping | DictConfig, groups: np.ndarray) -> None:
    """Once the training split is known (its rows' stimulus ids ``groups``), before any features are computed:
    the head class's ``check_training_set`` (a ridge's folds: no more folds than training images, ...)."""
    if isinstance(head, DictConfig):
        head = OmegaConf.to_container(head, resolve=True)
    built = head_partial(head)
    check = getattr(built.func, "check_training_set", None)
    if check is not None:
        try:
            check(np.asarray(groups), **built.keywords, prefix="head.")
        except ValueError as err:
            raise ConfigError(one_line(err)) from None


def check_data(data: Mapping, head: Mapping | None = None):
    """Instantiate the datamodule from ``data`` (less train.py's generator keys): its ``__init__`` checks its
    arguments and reads no data. Returns it. A ridge head that would shuffle a time series across its folds
    is refused here too."""
    arguments = {k: v for k, v in data.items() if k not in DATA_BUILD_KEYS}
    dm = _instantiate(arguments, "data")
    if getattr(dm, "time_series", False) and (head or {}).get("shuffle_folds", False):
        raise ConfigError(f"head.shuffle_folds=true would shuffle the TRs of data={data.get('name', dm)} (a time "
                          f"series) across cross-validation folds; set head.shuffle_folds=false")
    return dm


def check_optimizer(optimizer: Mapping | None, scheduler: Mapping | None) -> None:
    """Build the optimizer (and the scheduler on it) for one dummy parameter: torch checks the values."""
    if not optimizer:
        return
    built = _instantiate(optimizer, "optimizer")
    try:
        opt = built([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as err:
        raise ConfigError(f"optimizer ({optimizer.get('_target_')}): {one_line(err)}") from None
    if scheduler:
        built = _instantiate(scheduler, "scheduler")
        try:
            schedule = built(opt)
            opt.step()  # no gradient: changes nothing
            schedule.step()  # computes with its values (a gamma that is no number fails here)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"scheduler ({scheduler.get('_target_')}): {one_line(err)}") from None


@contextlib.contextmanager
def _throwaway(*loggers: str):
    """For a throwaway Trainer: its INFO lines ("GPU available: ...") and warnings silenced, and the global
    torch flags its constructor sets (deterministic algorithms, cuDNN benchmark, CUBLAS_WORKSPACE_CONFIG)
    put back afterwards, so the steps before the real Trainer run as they would without this check."""
    found = [logging.getLogger(n) for n in loggers]
    levels = [lg.level for lg in found]
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    for lg in found:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(found, levels):
            lg.setLevel(level)
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = flags[2], flags[3]
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


def check_trainer(trainer: Mapping, callbacks: Mapping | None = None) -> None:
    """Build a throwaway Trainer from the trainer options (no loggers, no callbacks) and every callback:
    Lightning checks devices, accelerator, strategy, ... in its constructors; nothing is written."""
    for name, callback in (callbacks or {}).items():
        if isinstance(callback, Mapping) and "_target_" in callback:
            _instantiate(callback, f"callbacks.{name}")
    with _throwaway("lightning.pytorch", "lightning.fabric", "lightning"):
        _instantiate(trainer, "trainer", logger=False, callbacks=[], enable_checkpointing=False)
