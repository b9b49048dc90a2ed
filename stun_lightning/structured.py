"""The structured phase as separate steps: choose the experts to keep, apply a choice, replay one.

``prune()`` runs the whole pipeline in one call. Training integrations need the steps apart: choose
the expert sets before the optimizer exists, record them, and on resume rebuild exactly those sets
on a freshly created dense model before the checkpoint's weights are loaded. Selection goes through
the same method registry, budget planning and feasibility checks as ``prune()``.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .adapters import moe_layers
from .calibration import ROUTING, calibrate
from .methods import SelectionContext, get_expert_method
from .prune import plan_expert_counts
from .recipe import StunRecipe
from .surgery import apply_top_k, keep_experts, sync_config


def needs_calibration(recipe: StunRecipe) -> bool:
    """Whether the recipe's expert method needs a routing pass over calibration data."""
    if recipe.expert_sparsity <= 0:
        return False
    return bool(get_expert_method(recipe.expert_method).needs_for(recipe.method_kwargs()))


def select_experts(
    model: nn.Module,
    recipe: StunRecipe,
    calibration: torch.Tensor | None = None,
    *,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[int, list[int]]:
    """Experts to keep per MoE layer (original indices, sorted) as ``prune()`` would choose them.

    Nothing is removed; a method may still change weights it selects (STUN's cluster averaging
    with ``merge_max_clusters``). Raises InfeasiblePruningError before any work for impossible budgets.
    """
    recipe.validate()
    layers = moe_layers(model)
    if recipe.expert_sparsity <= 0:
        return {layer.index: list(range(layer.num_experts)) for layer in layers}
    keep_total, per_layer, min_keep = plan_expert_counts(model, recipe)
    method = get_expert_method(recipe.expert_method)
    if per_layer is None and not method.supports_global:
        raise ValueError(f"method {recipe.expert_method!r} needs layer_budget='uniform'")
    stats = None
    if method.needs_for(recipe.method_kwargs()):
        if calibration is None:
            raise ValueError(
                f"expert method {recipe.expert_method!r} with these options needs calibration token ids [N, L] "
                "for a routing pass; pass calibration=..."
            )
        stats = calibrate(model, calibration, collect=(ROUTING,), batch_size=recipe.batch_size, device=device, progress=progress, desc="routing statistics")
    ctx = SelectionContext(model, layers, keep_total, per_layer, min_keep, stats, recipe.seed, recipe.method_kwargs())
    keep = {i: sorted(set(int(e) for e in v)) for i, v in method.select(ctx).items()}
    got = {layer.index: len(keep.get(layer.index, [])) for layer in layers}
    if (per_layer is not None and got != per_layer) or sum(got.values()) != keep_total:
        raise RuntimeError(f"expert method {recipe.expert_method!r} kept {got}, expected {per_layer or keep_total} in total")
    return keep


def apply_expert_sets(model: nn.Module, keep: Mapping[int, list[int]], lower_top_k: bool = False) -> dict[int, list[int]]:
    """Remove every expert not in ``keep`` (original indices of a dense model); return the removed ones."""
    removed = {}
    for layer in moe_layers(model):
        if layer.index not in keep:
            continue
        n = layer.num_experts
        kept = keep_experts(model, layer.index, keep[layer.index], lower_top_k=lower_top_k)
        removed[layer.index] = [e for e in range(n) if e not in kept]
    return removed


@torch.no_grad()
def resize_experts(model: nn.Module, counts: Mapping[int, int], top_k: Mapping[int, int] | None = None) -> None:
    """Give each MoE layer ``counts[i]`` experts, growing or shrinking the fused tensors, so a
    checkpoint of a pruned model can be loaded into it. Values are placeholders (zeros where grown):
    every resized tensor must then be filled from the checkpoint."""
    for layer in moe_layers(model):
        n = counts.get(layer.index)
        if n is None or n == layer.num_experts:
            continue
        if n < layer.num_experts:
            keep_experts(model, layer.index, range(n), lower_top_k=True)
            continue
        tensors = [(layer.experts, name) for name, _ in layer.experts.named_parameters(recurse=False)]
        tensors += [(layer.router, name) for name in layer.adapter.router_expert_tensors if getattr(layer.router, name, None) is not None]
        for module, name in tensors:
            old = getattr(module, name)
            new = old.new_zeros((n, *old.shape[1:]))
            new[: old.shape[0]] = old
            if isinstance(old, nn.Parameter):
                setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
            else:
                module.register_buffer(name, new, persistent=name in module.state_dict())
        for module in (layer.experts, layer.router):
            if hasattr(module, "num_experts"):
                module.num_experts = n
    if top_k:
        apply_top_k(model, top_k)
    sync_config(model)


__all__ = ["apply_expert_sets", "needs_calibration", "resize_experts", "select_experts"]
