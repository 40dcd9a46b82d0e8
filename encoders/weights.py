"""Weights for the frozen backbones: local files, the local hub caches, offline checks.

Nothing here downloads anything by itself: the libraries (timm, open_clip,
torchvision) download when the hub is reachable; this module only finds files
that are already cached, decides quickly whether the hub can be reached, and
loads local state-dict files strictly with readable errors.
"""
from __future__ import annotations

import os
import pickle
import socket
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

STATE_DICT_HINT = (
    "pass backbone.weights_path=/path/to/state_dict.pt "
    "(saved with torch.save(model.state_dict()))"
)
CONNECT_TIMEOUT_S = 3.0
_MAX_KEYS_SHOWN = 5
_WRAPPER_KEYS = ("state_dict", "model")  # {"state_dict": sd} / {"model": sd} checkpoints
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")  # DDP / torch.compile / FrozenBackbone
_TORCHSCRIPT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")  # OpenAI CLIP .pt


class WeightsError(RuntimeError):
    """Weights are missing, unreadable, or do not match the backbone."""


# ----------------------------------------------------------------------------- hub / cache


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set to a truthy value (read now, not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def host_reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """True if a TCP connection to the host of ``url`` opens within ``timeout`` seconds."""
    parsed = urlparse(url if "://" in url else f"https://{url}")
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def unreachable_reason(url: str) -> str | None:
    """None if the hub at ``url`` can be reached, else a short reason why not."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    if not host_reachable(url):
        host = urlparse(url if "://" in url else f"https://{url}").hostname
        return f"no connection to {host} within {CONNECT_TIMEOUT_S:g} s"
    return None


def hf_endpoint() -> str:
    """The Hugging Face hub endpoint (HF_ENDPOINT or huggingface_hub's default)."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def hf_cache_dir() -> str:
    """The HF hub cache directory, resolved from the environment *now*.

    huggingface_hub computes its constant at import time; reading the variables
    here makes a later change of HF_HOME / HF_HUB_CACHE (e.g. in tests) effective.
    """
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "huggingface", "hub")


def cached_hf_file(repo_id: str, filenames: Iterable[str]) -> str | None:
    """Path of the first of ``filenames`` of ``repo_id`` already in the HF cache, else None."""
    from huggingface_hub import try_to_load_from_cache

    cache_dir = hf_cache_dir()
    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def torch_hub_checkpoint(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` caches ``url`` (TORCH_HOME read now)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def not_cached_error(backbone: str, what: str, where: str, reason: str) -> WeightsError:
    """The error for pretrained weights that are neither cached nor downloadable."""
    return WeightsError(
        f"backbone '{backbone}': pretrained weights ({what}, {where}) are not in the local "
        f"cache and the hub cannot be reached ({reason}); put them in the cache or "
        f"{STATE_DICT_HINT}"
    )


# ----------------------------------------------------------------------------- local files


def _is_torchscript_archive(path: Path) -> bool:
    """True for a TorchScript zip (e.g. OpenAI's original CLIP ``RN50.pt``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/")[-1] == "constants.pkl" for name in archive.namelist())


def _torchscript_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """State dict of a TorchScript archive, minus OpenAI CLIP's non-weight entries."""
    with warnings.catch_warnings():  # torch.jit.load is deprecated, but these files need it
        warnings.simplefilter("ignore", FutureWarning)
        state_dict = torch.jit.load(str(path), map_location="cpu").state_dict()
    for key in _TORCHSCRIPT_EXTRA_KEYS:
        state_dict.pop(key, None)
    return dict(state_dict)


def _read_raw(path: Path, backbone: str, allow_torchscript: bool) -> object:
    """Deserialize ``path`` (.safetensors or torch.load(weights_only=True))."""
    from safetensors import SafetensorError

    if allow_torchscript and _is_torchscript_archive(path):
        return _torchscript_state_dict(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError,
            SafetensorError) as err:
        first_line = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise WeightsError(
            f"backbone '{backbone}': cannot read weights file {path}: "
            f"{type(err).__name__}: {first_line}"
        ) from err


def _unwrap(obj: object, path: Path, backbone: str) -> dict[str, torch.Tensor]:
    """Accept a state dict or {"state_dict"|"model": state dict}; check values are tensors."""
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(
            f"backbone '{backbone}': weights file {path} does not contain a state dict "
            f"(got {type(obj).__name__}); {STATE_DICT_HINT}"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(
            f"backbone '{backbone}': weights file {path} is not a plain state dict: "
            f"non-tensor entries {bad[:_MAX_KEYS_SHOWN]}; {STATE_DICT_HINT}"
        )
    return {str(k): v for k, v in obj.items()}


def _strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor], model_keys: set[str]
                            ) -> dict[str, torch.Tensor]:
    """Drop a "module." / "_orig_mod." / "model." prefix carried by *every* key."""
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state_dict) and \
                not all(k.startswith(prefix) for k in model_keys):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def read_state_dict(path: str | os.PathLike, backbone: str, model_keys: Iterable[str] = (),
                    allow_torchscript: bool = False) -> dict[str, torch.Tensor]:
    """Read a local state dict file.

    Accepts .pt/.pth/.bin (``torch.load(weights_only=True)``) and .safetensors, a bare
    state dict or one wrapped as {"state_dict": ...} / {"model": ...}, with DDP /
    torch.compile / FrozenBackbone key prefixes; with ``allow_torchscript`` also a
    TorchScript archive (OpenAI CLIP checkpoints).  Raises WeightsError.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise WeightsError(f"backbone '{backbone}': weights file not found: {file}")
    state_dict = _unwrap(_read_raw(file, backbone, allow_torchscript), file, backbone)
    return _strip_wrapper_prefixes(state_dict, set(model_keys))


def state_dict_problems(model: nn.Module, state_dict: Mapping[str, torch.Tensor]
                        ) -> dict[str, list[str]]:
    """Missing keys, unexpected keys and shape mismatches of ``state_dict`` for ``model``."""
    expected = model.state_dict()
    return {
        "missing keys": [k for k in expected if k not in state_dict],
        "unexpected keys": [k for k in state_dict if k not in expected],
        "shape mismatches": [
            f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
            for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape
        ],
    }


def _format_problems(problems: Mapping[str, list[str]]) -> str:
    """'missing keys (3): [a, b, c]; unexpected keys (1): [d]'."""
    parts = []
    for label, items in problems.items():
        if items:
            shown = ", ".join(items[:_MAX_KEYS_SHOWN]) + (", ..." if len(items) > _MAX_KEYS_SHOWN else "")
            parts.append(f"{label} ({len(items)}): [{shown}]")
    return "; ".join(parts)


Adapter = Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]


def _try_adapt(adapt: Adapter | None, state_dict: dict[str, torch.Tensor], model: nn.Module
               ) -> dict[str, torch.Tensor] | None:
    """Apply a library's checkpoint conversion; None if there is none or it fails."""
    if adapt is None:
        return None
    try:
        adapted = adapt(dict(state_dict), model)
    except (KeyError, RuntimeError, ValueError, AttributeError, TypeError, IndexError):
        return None
    return adapted if not any(state_dict_problems(model, adapted).values()) else None


def load_weights_file(model: nn.Module, path: str | os.PathLike, backbone: str,
                      adapt: Adapter | None = None, allow_torchscript: bool = False) -> None:
    """Strictly load a local state dict file into ``model`` (in place).

    The file must match the model's keys and shapes exactly; if it does not and
    ``adapt`` (a library's own checkpoint conversion, e.g. timm position-embedding
    resampling) produces an exact match, the adapted dict is loaded instead.
    Raises WeightsError naming the file and the first offending keys.
    """
    state_dict = read_state_dict(path, backbone, model.state_dict().keys(), allow_torchscript)
    problems = state_dict_problems(model, state_dict)
    if any(problems.values()):
        adapted = _try_adapt(adapt, state_dict, model)
        if adapted is None:
            raise WeightsError(
                f"backbone '{backbone}': weights file {Path(path).expanduser()} does not match "
                f"the model: {_format_problems(problems)}"
            )
        state_dict = adapted
    model.load_state_dict(state_dict, strict=True)


# ----------------------------------------------------------------------------- adapters


def adapt_open_clip_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module
                               ) -> dict[str, torch.Tensor]:
    """open_clip's own conversions (3rd-party formats, old text-tower layout, logit shapes)."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict

    state_dict = convert_state_dict(model, state_dict)
    if "positional_embedding" in state_dict and not hasattr(model, "positional_embedding"):
        state_dict = convert_to_custom_text_state_dict(state_dict)
    for key in ("logit_scale", "logit_bias"):
        target = getattr(model, key, None)
        if key in state_dict and target is not None and state_dict[key].ndim != target.ndim:
            state_dict[key] = state_dict[key].reshape(target.shape)
    return state_dict


def adapt_timm_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module
                          ) -> dict[str, torch.Tensor]:
    """timm's ``checkpoint_filter_fn`` of the model's module (e.g. pos-embed resampling)."""
    import importlib

    filter_fn = getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is None:
        raise ValueError(f"no checkpoint_filter_fn for {type(model).__name__}")
    return filter_fn(state_dict, model)
