"""Resuming a fit whose model changed shape: read a callback's state before Lightning loads weights.

Lightning restores a checkpoint in this order: the LightningModule's ``on_load_checkpoint``, the
module's weights, then callbacks' state. A model the user re-creates dense cannot take a pruned
checkpoint's weights, so the expert sets must be rebuilt before that load, from state Lightning
only hands to callbacks later. Two ways in, both used by StunCallback:

* :func:`callback_state_in`: when the checkpoint path is already known at ``setup``
  (``trainer.ckpt_path = ...``), read the state from the file directly (memory-mapped);
* :func:`intercept_on_load_checkpoint`: otherwise (``trainer.fit(ckpt_path=...)``) run a function
  on the checkpoint just before the module's own ``on_load_checkpoint``, i.e. before its weights load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from lightning.pytorch import LightningModule


def callback_state_in(path, state_key: str) -> dict | None:
    """The state saved under ``state_key`` in a local checkpoint file (None when there is none)."""
    if not path or not Path(str(path)).is_file():
        return None
    # a checkpoint the user chose to resume from; Lightning loads the same file next
    checkpoint = torch.load(str(path), map_location="cpu", mmap=True, weights_only=False)
    return checkpoint.get("callbacks", {}).get(state_key)


def intercept_on_load_checkpoint(pl_module: LightningModule, before: Callable[[dict], None]) -> Callable[[], None]:
    """Make ``pl_module.on_load_checkpoint`` call ``before(checkpoint)`` first; returns the undo."""
    original = pl_module.on_load_checkpoint

    def on_load_checkpoint(checkpoint: dict) -> Any:
        before(checkpoint)
        return original(checkpoint)

    pl_module.on_load_checkpoint = on_load_checkpoint  # an instance attribute: Lightning looks hooks up with getattr

    def undo() -> None:
        pl_module.__dict__.pop("on_load_checkpoint", None)

    return undo
