"""The one rule for how Weights & Biases runs: never waiting on a network that is not there.

train.py's logger (``offline: ${wandb_offline:}``) and every analysis job that logs use it.
"""
from __future__ import annotations

import os


def wandb_mode() -> str:
    """"online", "offline" or "disabled": ``WANDB_MODE`` when set ("dryrun" means offline; "online"/"run"
    online), else "online" when ``WANDB_API_KEY`` is set, else "offline"."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode:
        return {"dryrun": "offline", "offline": "offline", "disabled": "disabled"}.get(mode, "online")
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def wandb_offline() -> bool:
    """Whether a W&B logger must not reach the network (offline or disabled)."""
    return wandb_mode() != "online"
