"""LoRA on fused MoE experts (peft ``target_parameters``) and a merge that keeps pruned entries zero."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .adapters import get_adapter, moe_layers


def with_expert_targets(lora: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """``lora`` with the fused expert tensors of ``model``'s family added to ``target_parameters``."""
    attr = get_adapter(model).experts_attr
    targets = list(lora.get("target_parameters") or [])
    targets += [t for t in (f"{attr}.gate_up_proj", f"{attr}.down_proj") if t not in targets]
    # no target_modules means peft's per-architecture default (attention); [] means experts only
    return {"target_modules": [], **lora, "target_parameters": targets}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold a peft model's LoRA into its weights and return the plain model, with every fused expert
    entry that was exactly zero before the merge zero again (a dense delta must not undo pruning).

    The StunCallback merges at the end of a fit and re-applies its own masks; use this after a LoRA
    fit without the callback (e.g. recovery of a model pruned once with ``prune``).
    """
    if not hasattr(model, "merge_and_unload"):
        raise TypeError(f"{type(model).__name__} is not a peft model (no merge_and_unload); nothing to merge")
    was_zero = {
        layer.index: {n: getattr(layer.experts, n) == 0 for n in ("gate_up_proj", "down_proj")}
        for layer in moe_layers(model)
    }
    merged = model.merge_and_unload()
    for layer in moe_layers(merged):
        for name, zero in was_zero[layer.index].items():
            getattr(layer.experts, name).masked_fill_(zero, 0)
    return merged
