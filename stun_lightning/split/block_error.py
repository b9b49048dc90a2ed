"""``split_criterion="block_error"``: per-layer curves of relative block-output error over candidate
removal counts (also the curves of ``layer_budget="error_curve"``)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from ..adapters import MoELayer, moe_layers
from ..calibration import calibrate
from ..metrics import get_metric
from ..recipe import StunRecipe
from ..routing import router_logits_forced_to_minus_inf
from ..unstructured import expert_layer_masks
from .plan import (
    MAX_TOKENS,
    REMOVAL_FRACTIONS,
    SplitPlan,
    layer_count,
    removal_at,
    removals_within_target,
    select_at_counts,
    survivor_sparsity,
    survivor_sparsities,
)


@torch.no_grad()
def block_output(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """The MoE block's output ``[T, H]`` for tokens ``x`` ``[T, H]``."""
    out = layer.block(x[None])
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(-1, out.shape[-1])


@torch.no_grad()
def layer_error_curve(
    layer: MoELayer,
    inputs: list[torch.Tensor],
    outputs: list[torch.Tensor],
    keeps: dict[int, list[int]],
    sparsity_of: Callable[[int, int], float],
    recipe: StunRecipe,
    stats,
) -> dict[int, float]:
    """``{experts removed: relative squared block-output error}`` for each candidate keep set, its
    survivors masked at ``sparsity_of(experts, kept)``.

    The layer's expert weights are masked in place for each candidate and restored at the end."""
    E = layer.num_experts
    weights = layer.expert_matrices()
    original = {name: w.clone() for name, w in weights.items()}
    device = layer.router_weight.device
    dense_sq = sum(float(z.double().pow(2).sum()) for z in outputs)
    errors = {}
    drop: dict[int, list[int]] = {}
    try:
        with router_logits_forced_to_minus_inf([layer], drop):
            for r, kept in keeps.items():
                s = sparsity_of(E, len(kept))
                masks = expert_layer_masks(layer, original, stats, s, recipe)
                for name, w in weights.items():
                    w.copy_(original[name] * masks[name].to(w.dtype))
                drop[layer.index] = [e for e in range(E) if e not in set(kept)]
                err = 0.0
                for x, z in zip(inputs, outputs):
                    pruned = block_output(layer, x.to(device))
                    err += float((pruned.double() - z.to(device).double()).pow(2).sum())
                errors[r] = err / dense_sq if dense_sq > 0 else err
    finally:
        for name, w in weights.items():
            w.copy_(original[name])
    return errors


def error_curves(
    model: nn.Module,
    recipe: StunRecipe,
    calibration: torch.Tensor,
    removals: dict[int, dict[float, int]],
    min_keep: dict[int, int],
    sparsity_of: Callable[[int, int], float],
    *,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> tuple[dict[int, dict[int, list[int]]], dict[int, dict[int, float]], int, int]:
    """(kept experts per layer and removal count, relative block errors per layer and removal count,
    decoder-layer passes, block evaluations) for the candidate ``removals`` ``{layer: {fraction: r}}``;
    survivors of a layer with ``orig`` experts keeping ``kept`` are masked at ``sparsity_of(orig, kept)``."""
    if calibration is None:
        raise ValueError("error curves measure block outputs on calibration data: pass calibration token ids [N, L]")
    layers = moe_layers(model)
    # removals chosen by the recipe's method, one selection per candidate fraction (counts per layer)
    unmerged = dataclasses.replace(recipe, expert_merge="none")
    candidates = {layer.index: {0: list(range(layer.num_experts))} for layer in layers}
    passes = 0
    for f in REMOVAL_FRACTIONS[1:]:
        per_layer = {layer.index: layer.num_experts - removal_at(f, removals[layer.index]) for layer in layers}
        todo = {i: k for i, k in per_layer.items() if layer_count(layers, i) - k not in candidates[i]}
        if not todo:
            continue
        selection = select_at_counts(
            model, unmerged, calibration, per_layer, min_keep, device=device, progress=progress
        )
        passes += selection.layer_passes
        for i, k in todo.items():
            candidates[i][layer_count(layers, i) - k] = selection.keep[i]

    errors: dict[int, dict[int, float]] = {}
    evaluations = 0

    def on_layer(i, moe, stats) -> bool:
        nonlocal evaluations
        if moe is None:
            return False
        errors[i] = layer_error_curve(
            moe, stats.block_inputs, stats.block_outputs, candidates[i], sparsity_of, recipe, stats
        )
        evaluations += len(candidates[i]) * len(stats.block_inputs)
        stats.block_inputs.clear()
        stats.block_outputs.clear()
        return False

    stats = calibrate(
        model,
        calibration,
        collect=get_metric(recipe.metric).collect(),
        batch_size=recipe.batch_size,
        device=device,
        on_layer=on_layer,
        keep_block_io=min(MAX_TOKENS, calibration.numel()),
        progress=progress,
        desc="expert error curves",
    )
    return candidates, errors, passes + stats.layer_passes, evaluations


def choose_split_by_block_error(
    model: nn.Module,
    recipe: StunRecipe,
    calibration: torch.Tensor,
    *,
    min_keep: dict[int, int],
    device: str | torch.device | None = None,
    progress: bool = False,
) -> SplitPlan:
    """``split_criterion="block_error"``: each layer's removal count of least relative block-output error."""
    target = float(recipe.total_sparsity)
    layers = moe_layers(model)
    removals = removals_within_target(model, target, min_keep)
    sparsity_of = lambda orig, kept: survivor_sparsity(target, orig, kept)  # noqa: E731
    candidates, errors, passes, evaluations = error_curves(
        model, recipe, calibration, removals, min_keep, sparsity_of, device=device, progress=progress
    )
    removed = {i: min(curve, key=lambda r: (curve[r], r)) for i, curve in errors.items()}
    keep = {i: candidates[i][r] for i, r in removed.items()}
    return SplitPlan(
        target, keep, removed, survivor_sparsities(target, layers, keep), errors, passes, evaluations, candidates
    )
