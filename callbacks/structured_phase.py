"""StunCallback's structured phase: remove experts at ``setup``, before any optimizer exists.

The recipe's expert method, budget and checks, as ``prune()``; the calibration ids come from the
callback or from the datamodule. Under DDP every rank ends with rank 0's expert sets.
"""

from __future__ import annotations

import torch
from torch import nn

from stun_lightning.adapters import moe_layers
from stun_lightning.distributed import broadcast_object, calibration_across_ranks
from stun_lightning.recipe import StunRecipe
from stun_lightning.structured import apply_expert_sets, needs_calibration, select_experts


def calibration_for(recipe: StunRecipe, calibration: torch.Tensor | None, datamodule) -> torch.Tensor | None:
    """Token ids ``[N, L]`` for the routing pass of the recipe's expert method: the callback's own,
    else the datamodule's ``calibration_ids()``; None when the method needs none."""
    if not needs_calibration(recipe):
        return None
    if calibration is None and datamodule is not None and hasattr(datamodule, "calibration_ids"):
        calibration = datamodule.calibration_ids()
    if calibration is None:
        raise ValueError(
            f"expert method {recipe.expert_method!r} needs calibration token ids for a routing pass: pass "
            "StunCallback(calibration=ids [N, L]) or a datamodule with calibration_ids() (StunDataModule)"
        )
    return calibration


def select_and_remove_experts(
    model: nn.Module, recipe: StunRecipe, calibration: torch.Tensor | None, device: torch.device
) -> tuple[dict[int, list[int]], dict[int, list[int]], dict[int, int]]:
    """Select and remove experts in place; (kept experts, removed experts, top-k) per MoE layer."""
    # under DDP each rank calibrates on its slice and statistics are all-reduced; rank 0's choice
    # is then adopted everywhere (DDP also broadcasts rank 0's weights when it wraps the module)
    with calibration_across_ranks():
        keep = select_experts(model, recipe, calibration, device=device)
    keep = broadcast_object(keep)
    removed = apply_expert_sets(model, keep, lower_top_k=recipe.lower_top_k)
    return keep, removed, {layer.index: layer.top_k for layer in moe_layers(model)}
