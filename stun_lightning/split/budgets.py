"""``layer_budget="error_curve"``: a fixed expert removal count spread over layers by block-error
curves, an exact dynamic programme."""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import moe_layers
from ..recipe import StunRecipe
from .block_error import error_curves
from .plan import group_counts, removals_per_layer


def interpolate(curve: dict[int, float], r: int) -> float:
    """The error at removal count ``r``, linear between measured counts (flat beyond the last)."""
    points = sorted(curve.items())
    if r <= points[0][0]:
        return points[0][1]
    for (r0, e0), (r1, e1) in zip(points, points[1:]):
        if r <= r1:
            return e0 + (e1 - e0) * (r - r0) / (r1 - r0)
    return points[-1][1]


def allocate_removals(curves: dict[int, dict[int, float]], total: int, step: int = 1) -> dict[int, int]:
    """Removal counts per layer, multiples of ``step``, each within its curve's measured range,
    summing to ``total`` exactly and minimising the summed (interpolated) error: an exact dynamic
    programme over layers (ties: fewer removals in earlier layers)."""
    if total % step:
        raise ValueError(f"{total} removals are not a multiple of the expert-group size {step}")
    units = total // step
    best: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
    for i in curves:
        top = max(curves[i]) // step
        nxt: dict[int, tuple[float, tuple[int, ...]]] = {}
        for used, (err, picks) in best.items():
            for u in range(0, min(top, units - used) + 1):
                cand = (err + interpolate(curves[i], u * step), picks + (u * step,))
                if used + u not in nxt or cand[0] < nxt[used + u][0] - 1e-12:
                    nxt[used + u] = cand
        best = nxt
    if units not in best:
        most = sum(max(c) for c in curves.values())
        raise ValueError(
            f"layer_budget='error_curve' spreads at most {most} removals over the layers (half of each layer's experts, "
            f"top-k and groups kept), {total} asked; lower expert_sparsity or use layer_budget='uniform'"
        )
    return dict(zip(curves, best[units][1]))


def choose_budgets(
    model: nn.Module,
    recipe: StunRecipe,
    calibration: torch.Tensor,
    *,
    keep_total: int,
    min_keep: dict[int, int],
    device: str | torch.device | None = None,
    progress: bool = False,
) -> tuple[dict[int, int], dict, int]:
    """``layer_budget="error_curve"``: (experts to keep per layer, record for the report, passes).

    The removals of a fixed ``expert_sparsity`` spread over layers to minimise the summed relative
    block-output error, from the curves of :func:`error_curves` (survivors masked at the recipe's
    within-expert sparsity: ``sparsity``, or the one ``total_sparsity`` implies)."""
    layers = moe_layers(model)
    total = sum(layer.num_experts for layer in layers) - keep_total
    within = recipe.sparsity
    if recipe.total_sparsity is not None:
        within = max(0.0, 1.0 - (1.0 - recipe.total_sparsity) * sum(layer.num_experts for layer in layers) / keep_total)
    _, errors, passes, evaluations = error_curves(
        model,
        recipe,
        calibration,
        removals_per_layer(model, min_keep),
        min_keep,
        lambda orig, kept: within,
        device=device,
        progress=progress,
    )
    removed = allocate_removals(errors, total, group_counts(model)[0])
    record = {
        "budget": "error_curve",
        "removed": removed,
        "errors": {i: {r: round(e, 6) for r, e in c.items()} for i, c in errors.items()},
        "block_evaluations": evaluations,
    }
    return {layer.index: layer.num_experts - removed[layer.index] for layer in layers}, record, passes
