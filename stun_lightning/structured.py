"""The structured phase as separate steps: choose the experts to keep, apply a choice, replay one.

``prune()`` runs the whole pipeline in one call. Training integrations need the steps apart: choose
the expert sets before the optimizer exists, record them, and on resume rebuild exactly those sets
on a freshly created dense model before the checkpoint's weights are loaded. Selection goes through
the same method registry, budget planning and feasibility checks as ``prune()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from .adapters import get_adapter, moe_layers
from .calibration import ROUTING, calibrate
from .methods import SelectionContext, get_expert_method
from .recipe import StunRecipe
from .surgery import InfeasiblePruningError, apply_top_k, check_expert_counts, keep_experts, sync_config


@dataclass
class ExpertSelection:
    """The structured phase's choice: experts kept per layer (original indices, sorted), the
    decoder-layer passes spent choosing them, and for ``expert_sparsity="auto"`` the chosen split
    (:meth:`stun_lightning.split.SplitPlan.to_dict`)."""

    keep: dict[int, list[int]]
    layer_passes: int = 0
    split: dict | None = None
    merge_mass: dict[int, torch.Tensor] | None = None  # expert_merge: per-expert mass on the dense model
    candidate: object | None = None  # auto by model_loss: the scored candidate whose masks prune() applies


def min_keep_per_layer(model: nn.Module, recipe: StunRecipe) -> dict[int, int]:
    """The fewest experts each MoE layer may keep: top-k (1 with ``lower_top_k``), or more under
    ``max_removed_per_layer``."""
    min_keep = {}
    for layer in moe_layers(model):
        floor = 1 if recipe.lower_top_k else layer.top_k
        if recipe.max_removed_per_layer is not None:
            floor = max(floor, layer.num_experts - recipe.max_removed_per_layer)
        min_keep[layer.index] = floor
    return min_keep


def plan_expert_counts(model: nn.Module, recipe: StunRecipe) -> tuple[int, dict[int, int] | None, dict[int, int]]:
    """(experts to keep in total, per-layer counts or None for a global budget, per-layer minimum).

    Checks feasibility before any work is done. With ``expert_sparsity="auto"`` the counts are
    chosen later (``stun_lightning.split``): (all experts, None, minimum).
    """
    layers = moe_layers(model)
    adapter = get_adapter(model)
    n_group = getattr(model.config, adapter.group_field, None) if adapter.group_field else None
    min_keep = min_keep_per_layer(model, recipe)
    total = sum(layer.num_experts for layer in layers)
    if recipe.auto_split:
        return total, None, min_keep
    if recipe.layer_budget == "error_curve":  # counts per layer chosen later (stun_lightning.split.choose_budgets)
        step = n_group if n_group and n_group > 1 else 1
        keep_total = total - int(round(total * recipe.expert_sparsity / step)) * step
        from .split import candidate_removals, group_counts

        groups = group_counts(model)
        most = sum(
            max(candidate_removals(layer.num_experts, min_keep[layer.index], *groups, layer.top_k).values())
            for layer in layers
        )
        if total - keep_total > most:
            raise InfeasiblePruningError(
                f"layer_budget='error_curve' removes at most {most} experts (up to half of each layer's, top-k and expert groups "
                f"kept), expert_sparsity={recipe.expert_sparsity} asks {total - keep_total}; lower expert_sparsity or use layer_budget='uniform'"
            )
        return keep_total, None, min_keep
    keep_total = total - int(round(total * recipe.expert_sparsity))
    if recipe.layer_budget == "uniform" or (n_group and n_group > 1 and recipe.expert_sparsity > 0):
        per_layer = {
            layer.index: layer.num_experts - int(round(layer.num_experts * recipe.expert_sparsity)) for layer in layers
        }
        check_expert_counts(model, per_layer, lower_top_k=recipe.lower_top_k)
        for i, k in per_layer.items():
            if k < min_keep[i]:
                raise InfeasiblePruningError(
                    f"layer {i}: keeping {k} experts breaks max_removed_per_layer={recipe.max_removed_per_layer}; lower expert_sparsity"
                )
        return sum(per_layer.values()), per_layer, min_keep
    if keep_total < sum(min_keep.values()):
        raise InfeasiblePruningError(
            f"expert_sparsity={recipe.expert_sparsity} keeps {keep_total} experts in total, but every layer needs at "
            f"least top-k ({sum(min_keep.values())} in total); lower expert_sparsity or set lower_top_k=True"
        )
    return keep_total, None, min_keep


def needs_calibration(recipe: StunRecipe) -> bool:
    """Whether the recipe's expert method needs a routing pass over calibration data."""
    if not recipe.removes_experts:
        return False
    if recipe.auto_split or recipe.expert_merge != "none" or recipe.layer_budget == "error_curve":
        return True
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
    with ``merge_max_clusters``, EEP/UNCURL merging). Raises InfeasiblePruningError before any work
    for impossible budgets.
    """
    return choose_experts(model, recipe, calibration, device=device, progress=progress).keep


def choose_experts(
    model: nn.Module,
    recipe: StunRecipe,
    calibration: torch.Tensor | None = None,
    *,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> ExpertSelection:
    """:func:`select_experts` with the passes spent and, for ``auto``, the chosen split."""
    recipe.validate()
    if not recipe.removes_experts:
        return ExpertSelection({layer.index: list(range(layer.num_experts)) for layer in moe_layers(model)})
    return run_selection(model, recipe, calibration, device=device, progress=progress)


def run_selection(
    model: nn.Module,
    recipe: StunRecipe,
    calibration: torch.Tensor | None,
    *,
    plan: tuple[int, dict[int, int] | None, dict[int, int]] | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> ExpertSelection:
    """Experts to keep per layer and the decoder-layer passes spent choosing them.

    One shared pass collects the statistic the method declares (``needs``: "routing", "saliency");
    methods that declare "data" get the token ids and run their own passes, counted too.
    ``expert_sparsity="auto"`` chooses the counts per layer first (``stun_lightning.split``).
    """
    keep_total, per_layer, min_keep = plan or plan_expert_counts(model, recipe)
    if recipe.auto_split:
        from .split import choose_split

        chosen = choose_split(model, recipe, calibration, min_keep=min_keep, device=device, progress=progress)
        if chosen.candidate is not None:  # the merge mass the scored candidate was pruned with
            mass, n = chosen.candidate.merge_mass, 0
        else:
            mass, n = _merge_mass(model, recipe, calibration, None, device, progress)
        return ExpertSelection(chosen.keep, chosen.layer_passes + n, chosen.to_dict(), mass, chosen.candidate)
    budget, budget_passes = None, 0
    if per_layer is None and recipe.layer_budget == "error_curve":
        from .split import choose_budgets

        per_layer, budget, budget_passes = choose_budgets(
            model, recipe, calibration, keep_total=keep_total, min_keep=min_keep, device=device, progress=progress
        )
    method = get_expert_method(recipe.expert_method)
    if per_layer is None and not method.supports_global:
        raise ValueError(f"method {recipe.expert_method!r} needs layer_budget='uniform'")
    needs = method.needs_for(recipe.method_kwargs())
    if needs and calibration is None:
        raise ValueError(
            f"expert method {recipe.expert_method!r} with these options needs calibration token ids [N, L]; pass calibration=..."
        )
    stats, passes = None, 0
    if needs and needs != "data":
        stats = calibrate(
            model,
            calibration,
            collect=(ROUTING, needs),
            batch_size=recipe.batch_size,
            device=device,
            progress=progress,
            desc=f"{needs} statistics",
        )
        passes = stats.layer_passes
    layers = moe_layers(model)
    ctx = SelectionContext(
        model,
        layers,
        keep_total,
        per_layer,
        min_keep,
        stats,
        recipe.seed,
        recipe.method_kwargs(),
        calibration=calibration,
        batch_size=recipe.batch_size,
        device=device,
        progress=progress,
    )
    keep = {i: sorted(set(int(e) for e in v)) for i, v in method.select(ctx).items()}
    got = {layer.index: len(keep.get(layer.index, [])) for layer in layers}
    if (per_layer is not None and got != per_layer) or sum(got.values()) != keep_total:
        raise RuntimeError(
            f"expert method {recipe.expert_method!r} kept {got}, expected {per_layer or keep_total} in total"
        )
    mass, n = _merge_mass(model, recipe, calibration, stats, device, progress)
    return ExpertSelection(keep, budget_passes + passes + ctx.layer_passes + n, split=budget, merge_mass=mass)


def _merge_mass(model, recipe, calibration, stats, device, progress) -> tuple[dict[int, torch.Tensor] | None, int]:
    """(per-expert merge mass per layer, passes spent): from the selection's routing statistics when
    it collected them, else one routing pass; None without ``expert_merge``."""
    if recipe.expert_merge == "none":
        return None, 0
    from .merging import merge_mass

    passes = 0
    if stats is None:
        if calibration is None:
            raise ValueError(
                f"expert_merge={recipe.expert_merge!r} weighs experts by their routing: pass calibration token ids [N, L]"
            )
        stats = calibrate(
            model,
            calibration,
            collect=(ROUTING,),
            batch_size=recipe.batch_size,
            device=device,
            progress=progress,
            desc="merge weights",
        )
        passes = stats.layer_passes
    return {layer.index: merge_mass(stats[layer.index], recipe.expert_merge) for layer in moe_layers(model)}, passes


def apply_expert_sets(
    model: nn.Module,
    keep: Mapping[int, list[int]],
    lower_top_k: bool = False,
    merge_mass: Mapping[int, torch.Tensor] | None = None,
) -> dict[int, list[int]]:
    """Remove every expert not in ``keep`` (original indices of a dense model); return the removed ones.

    With ``merge_mass`` (``ExpertSelection.merge_mass``) each removed expert is first merged into its
    nearest survivor (:func:`stun_lightning.merging.merge_into_survivors`)."""
    if merge_mass:
        from .merging import merge_into_survivors

        merge_into_survivors(model, keep, merge_mass)
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
        tensors += [
            (layer.router, name)
            for name in layer.adapter.router_expert_tensors
            if getattr(layer.router, name, None) is not None
        ]
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


__all__ = [
    "ExpertSelection",
    "apply_expert_sets",
    "choose_experts",
    "min_keep_per_layer",
    "needs_calibration",
    "plan_expert_counts",
    "resize_experts",
    "run_selection",
    "select_experts",
]
