"""The one rule for how Weights & Biases runs: never waiting on a network that is not there.

    wandb_mode()                       # "online" | "offline" | "disabled", from WANDB_MODE / WANDB_API_KEY
    decision = effective_mode(5.0)     # online only if the W&B server answers within 5 s
    decision.mode, decision.warning    # "offline", "W&B server https://… did not answer …; logging offline"

Online when ``WANDB_MODE=online`` (or ``run``/``shared``), or when it is unset and ``WANDB_API_KEY`` is set;
otherwise offline (``dryrun`` = offline) or disabled. An empty ``WANDB_MODE`` counts as unset (it is removed
from the environment: wandb itself refuses it); any other value is a ``WandbModeError`` naming it.

Before an online run starts, ``effective_mode`` asks the W&B server (``WANDB_BASE_URL``, else wandb's default
server) for any HTTP answer, for at most ``probe_timeout`` seconds (DNS, connect and answer together, in a
thread). Without one the run goes offline with one warning line, and every later run of the process does too,
without asking again or repeating the warning: a missing network costs seconds, not wandb's 90 s init timeout and a traceback.
train.py's logger (encoders.wandb_run.TrainingLogger) and every analysis job that logs use this.
"""
from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass

# WANDB_MODE values wandb accepts, and what they mean here.
MODES = {"online": "online", "run": "online", "shared": "online", "offline": "offline", "dryrun": "offline",
         "disabled": "disabled"}
PROBE_TIMEOUT_S = 5.0

# Servers found unreachable in this process: url -> the reason (later runs go offline without asking again).
_unreachable: dict[str, str] = {}


class WandbModeError(ValueError):
    """WANDB_MODE holds a value wandb does not know; the message names it and the valid ones."""


def wandb_mode() -> str:
    """"online", "offline" or "disabled": ``WANDB_MODE`` when set ("dryrun" means offline; "online"/"run"/
    "shared" online), else "online" when ``WANDB_API_KEY`` is set, else "offline". An empty WANDB_MODE is
    removed from the environment (wandb would refuse it); an unknown one raises WandbModeError."""
    raw = os.environ.get("WANDB_MODE")
    if raw is not None and not raw.strip():
        del os.environ["WANDB_MODE"]
        raw = None
    if raw:
        mode = MODES.get(raw.strip().lower())
        if mode is None:
            raise WandbModeError(f"WANDB_MODE={raw!r} is not a W&B mode (one of {', '.join(MODES)}); "
                                 "unset it to log offline")
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def wandb_offline() -> bool:
    """Whether a W&B logger must not reach the network (offline or disabled)."""
    return wandb_mode() != "online"


def server_url() -> str:
    """The W&B server an online run talks to: ``WANDB_BASE_URL``, else wandb's default."""
    url = os.environ.get("WANDB_BASE_URL", "").strip()
    if url:
        return url
    import wandb

    return str(wandb.Settings().base_url)


def probe(url: str, timeout: float) -> str | None:
    """None when ``url`` gives any HTTP answer (an error status counts: the server is there) within
    ``timeout`` seconds; otherwise the reason, one line. DNS, connecting and the answer are bounded together."""
    outcome: list[str | None] = []

    def ask():
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout):
                outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            outcome.append(str(reason).strip().splitlines()[0] if str(reason).strip() else type(err).__name__)

    thread = threading.Thread(target=ask, daemon=True, name="wandb-probe")
    thread.start()
    thread.join(timeout)
    if not outcome:
        return f"no answer within {timeout:g} s"
    return outcome[0]


@dataclass
class ModeDecision:
    """The mode a W&B run starts in, and the one warning line to print when it is not the one asked for."""

    mode: str
    warning: str | None = None
    url: str | None = None


def effective_mode(probe_timeout: float = PROBE_TIMEOUT_S, requested: str | None = None) -> ModeDecision:
    """``requested`` (default ``wandb_mode()``), but "offline" when it is "online" and the W&B server does not
    answer within ``probe_timeout`` seconds — with the warning line the first time in this process, without it
    (and without asking again) afterwards."""
    mode = requested or wandb_mode()
    if mode != "online":
        return ModeDecision(mode)
    url = server_url()
    if url in _unreachable:  # said once already in this process
        return ModeDecision("offline", None, url)
    reason = probe(url, float(probe_timeout))
    if reason is None:
        return ModeDecision("online", url=url)
    mark_unreachable(url, reason)
    return ModeDecision("offline", f"W&B server {url} unreachable ({reason}); logging offline instead", url)


def mark_unreachable(url: str, reason: str) -> None:
    """Remember for this process that ``url`` cannot be used (later runs go offline at once)."""
    _unreachable[url] = reason


def forget_unreachable() -> None:
    """Ask the server again next time (tests; a network that came back)."""
    _unreachable.clear()
