"""Resuming a fit whose model changed shape: read a callback's state before Lightning loads weights.

Also the StunCallback's checkpoint state itself (:func:`dump_state`, :func:`restore_state`, called by
its ``state_dict`` / ``load_state_dict``, Lightning's checkpoint hooks).

Lightning restores a checkpoint in this order: the LightningModule's ``on_load_checkpoint``, the
module's weights, then callbacks' state. A model the user re-creates dense cannot take a pruned
checkpoint's weights, so the expert sets must be rebuilt before that load, from state Lightning
only hands to callbacks later. Two ways in, both used by StunCallback:

* :func:`callback_state_in`: when the checkpoint path is already known at ``setup``
  (``trainer.ckpt_path = ...``), read the state from the file directly (memory-mapped);
* :func:`intercept_on_load_checkpoint`: otherwise (``trainer.fit(ckpt_path=...)``) run a function
  on the checkpoint just before the module's own ``on_load_checkpoint``, i.e. before its weights load.

Strategies that restore after ``setup`` (``ModelParallelStrategy``: FSDP2 shards in
``configure_model``, then the strategy loads the sharded weights itself, before any hook sees the
checkpoint) fix the model's shapes before the checkpoint is read. A sharded checkpoint is a
directory whose ``meta.pt`` holds everything but the tensors; :func:`callback_state_in` reads it
there, and :func:`intercept_strategy_load` checks the callback's state against the model before
the strategy loads any tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from lightning.pytorch import LightningModule
from torch import nn

from stun_lightning.expert_masks import ExpertMasks
from stun_lightning.schedule import SparsitySchedule
from stun_lightning.structured import apply_expert_sets, resize_experts
from stun_lightning.surgery import apply_top_k, sync_config


SHARDED_METADATA = "meta.pt"  # lightning.fabric.utilities.load._METADATA_FILENAME


def callback_state_in(path, state_key: str) -> dict | None:
    """The state saved under ``state_key`` in a local checkpoint file, or in the metadata of a sharded
    checkpoint directory (None when there is none)."""
    if not path:
        return None
    path = Path(str(path))
    if path.is_dir() and (path / SHARDED_METADATA).is_file():
        path = path / SHARDED_METADATA
    if not path.is_file():
        return None
    # a checkpoint the user chose to resume from; Lightning loads the same file next
    checkpoint = torch.load(str(path), map_location="cpu", mmap=True, weights_only=False)
    return checkpoint.get("callbacks", {}).get(state_key)


def intercept_strategy_load(strategy, before: Callable[[Any], None]) -> Callable[[], None]:
    """Make ``strategy.load_checkpoint(path)`` call ``before(path)`` first; returns the undo."""
    original = strategy.load_checkpoint

    def load_checkpoint(checkpoint_path, *args, **kwargs):
        before(checkpoint_path)
        return original(checkpoint_path, *args, **kwargs)

    strategy.load_checkpoint = load_checkpoint

    def undo() -> None:
        strategy.__dict__.pop("load_checkpoint", None)

    return undo


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


def rebuild_expert_sets(model: nn.Module, state: dict, current: dict[int, list[int]] | None):
    """Give ``model`` the expert sets of a StunCallback state; returns ``(kept, removed, top_k)``, or
    None when the model already has them. A model already pruned differently is only resized:
    its weights come from the checkpoint next."""
    saved = {int(k): list(v) for k, v in state["kept_experts"].items()}
    if current == saved:
        return None
    top_k = {int(k): int(v) for k, v in state["top_k"].items()}
    if current is None:
        apply_expert_sets(model, saved, lower_top_k=True)
    else:
        resize_experts(model, {i: len(v) for i, v in saved.items()})
    apply_top_k(model, top_k)
    sync_config(model)
    return saved, {int(k): list(v) for k, v in state["removed_experts"].items()}, top_k


def check_expert_sets_before_load(path, state: dict | None, kept: dict[int, list[int]] | None) -> None:
    """Refuse to load a checkpoint into a model already sharded with other expert sets."""
    if state is None:
        return
    saved = {int(k): list(v) for k, v in state["kept_experts"].items()}
    if saved != kept:
        raise RuntimeError(
            f"checkpoint {path} holds expert sets {saved}, but this fit's structured phase chose {kept}, and the strategy "
            f"shards the model before it reads the checkpoint; set trainer.ckpt_path = {str(path)!r} before trainer.fit(...) "
            "(and pass no ckpt_path), or use stun-lightning fit --ckpt_path, so the expert sets are rebuilt at setup"
        )


STATE_VERSION = 1


def dump_state(cb, schedule: SparsitySchedule | None, open_stats: dict | None) -> dict[str, Any]:
    """A StunCallback's checkpoint state: expert sets, masks (one bit per weight), schedule position.

    Reads only the callback's public checkpoint attributes; what it keeps private, the callback
    passes in: the ``schedule`` resolved at fit start and the statistics of an ``open_stats``
    window the checkpoint interrupts (``ActivationStats.state_dict()``), so the resumed update sees
    all of them."""
    return {
        "version": STATE_VERSION,
        "recipe": cb.recipe.to_dict(),
        "kept_experts": cb.kept_experts,
        "removed_experts": cb.removed_experts,
        "top_k": cb.top_k,
        "masks": cb.masks.state_dict(),
        "last_update_step": cb.last_update_step,
        "current_sparsity": cb.current_sparsity,
        "layer_targets": cb.layer_targets,
        "low_token_experts": cb.low_token_experts,
        "schedule": schedule.to_dict() if schedule else None,
        "open_stats": open_stats,
    }


def restore_state(cb, state: dict[str, Any]) -> dict | None:
    """Load :func:`dump_state`'s output into the public checkpoint attributes of a StunCallback whose
    model already has those expert sets; returns the interrupted window's statistics (or None) for
    the callback to resume its window with."""
    saved = {int(k): list(v) for k, v in state["kept_experts"].items()}
    if cb.kept_experts is not None and cb.kept_experts != saved:
        raise RuntimeError(
            "the checkpoint's expert sets differ from the model's; they are rebuilt from the module's "
            "on_load_checkpoint, which this callback wraps at setup: was the callback set up before loading?"
        )
    cb.kept_experts = saved
    cb.removed_experts = {int(k): list(v) for k, v in state["removed_experts"].items()}
    cb.top_k = {int(k): int(v) for k, v in state["top_k"].items()}
    cb.masks = ExpertMasks.from_state_dict(state["masks"])
    cb.last_update_step = int(state["last_update_step"])
    cb.current_sparsity = float(state["current_sparsity"])
    cb.layer_targets = {int(k): float(v) for k, v in state["layer_targets"].items()}
    cb.low_token_experts = {int(k): list(v) for k, v in state["low_token_experts"].items()}
    return state.get("open_stats")
