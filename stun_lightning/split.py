"""``expert_sparsity: "auto"``: how many experts each layer loses, chosen from error curves.

For a target ``T`` (``recipe.total_sparsity``) over expert parameters, a layer that keeps ``kept``
of its ``orig`` experts and masks the survivors at ``s`` has expert sparsity ``1 - (1 - s) * kept /
orig``; it meets ``T`` with ``s = 1 - (1 - T) * orig / kept``. Per MoE layer we try removing
``r`` experts for ``r`` in :data:`REMOVAL_FRACTIONS` of ``orig`` (rounded; at least top-k kept, and
for expert-group routers (DeepSeek-V3) multiples of ``n_group`` with every group keeping what its
routing needs), the experts to remove chosen by ``recipe.expert_method`` at that count, the survivors
masked with the recipe's metric at that layer's ``s``, and measure the relative squared error of the
MoE block output against the dense block on the calibration tokens,
``sum ||Z - Z'||^2 / sum ||Z||^2``, with the removed experts' router logits forced to ``-inf``
(exactly removal for softmax routers with or without renormalisation and GPT-OSS; for DeepSeek-V3
groups an approximation, as surgery re-forms the groups). Each layer then keeps the removal count of
least error (ties: fewer removals), so every layer meets ``T`` and so does the total, exactly up to
mask rounding; the unstructured phase gives each layer that ``s`` (``allocation_base="layer"``,
which ``auto`` implies).

``layer_budget="error_curve"`` (:func:`choose_budgets`) uses the same curves for a fixed
``expert_sparsity``: survivors masked at the recipe's within-expert sparsity, the total removal
count spread over layers (multiples of ``n_group``) to minimise the summed error, linear between
measured counts, by an exact dynamic programme (:func:`allocate_removals`); STUN's ``global``
threshold instead compares router distances across layers and can pile removals into one layer.

Cost, independent of the expert count: one selection per candidate count (the method's own passes,
e.g. one routing pass for ``frequency``), one streamed calibration pass for the statistics of the
metric and the block inputs, and one block forward per candidate and calibration batch (at most
:data:`MAX_TOKENS` tokens per layer). Inputs are the dense model's (not sequential).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .adapters import MoELayer, get_adapter, moe_layers
from .calibration import calibrate
from .metrics import get_metric
from .recipe import StunRecipe
from .routing import router_logits_forced_to_minus_inf

#: fractions of a layer's experts tried as removals
REMOVAL_FRACTIONS = (0.0, 0.125, 0.25, 0.375, 0.5)
#: calibration tokens per layer whose block outputs the error curves compare
MAX_TOKENS = 8192
#: experts a DeepSeek-V3 group needs at the least (its group score sums its top-2 experts)
GROUP_MIN_EXPERTS = 2


@dataclass
class SplitPlan:
    """What ``auto`` chose: experts kept per layer and the curves it chose from."""

    target: float
    keep: dict[int, list[int]]
    removed: dict[int, int]  # experts removed per layer
    within: dict[int, float]  # sparsity inside the survivors per layer
    errors: dict[int, dict[int, float]]  # layer -> {experts removed: relative block-output error}
    layer_passes: int = 0
    block_evaluations: int = 0
    candidates: dict[int, dict[int, list[int]]] = field(default_factory=dict, repr=False)  # layer -> {r: kept}

    def to_dict(self) -> dict:
        """The record in the prune report (``expert_split``)."""
        return {
            "target": self.target,
            "removed": dict(self.removed),
            "within": {i: round(s, 6) for i, s in self.within.items()},
            "errors": {i: {r: round(e, 6) for r, e in c.items()} for i, c in self.errors.items()},
            "block_evaluations": self.block_evaluations,
        }


def survivor_sparsity(target: float, orig: int, kept: int) -> float:
    """Sparsity inside ``kept`` of ``orig`` equal experts that makes the layer's expert sparsity ``target``."""
    return 1.0 - (1.0 - target) * orig / kept


def group_counts(model: nn.Module) -> tuple[int, int]:
    """(n_group, topk_group) of an expert-group router, (1, 1) for every other family."""
    adapter = get_adapter(model)
    n_group = int(getattr(model.config, adapter.group_field, None) or 1) if adapter.group_field else 1
    topk_group = int(getattr(model.config, adapter.topk_group_field, None) or 1) if adapter.topk_group_field else 1
    return n_group, topk_group


def candidate_removals(num_experts: int, min_keep: int, n_group: int = 1, topk_group: int = 1, top_k: int = 1) -> dict[float, int]:
    """``{fraction: experts removed}`` for the feasible fractions of :data:`REMOVAL_FRACTIONS`.

    With ``n_group > 1`` counts are multiples of ``n_group`` (groups stay equal) and each group keeps
    at least :data:`GROUP_MIN_EXPERTS` and enough for ``top_k`` over ``topk_group`` groups."""
    out = {}
    for f in REMOVAL_FRACTIONS:
        r = int(round(num_experts * f / n_group)) * n_group
        kept = num_experts - r
        if kept < min_keep:
            continue
        if n_group > 1 and (kept // n_group < GROUP_MIN_EXPERTS or (kept // n_group) * topk_group < top_k):
            continue
        out[f] = r
    return out


def _removal_at(fraction: float, removals: dict[float, int]) -> int:
    # the largest feasible removal not above this fraction's
    return max(r for f, r in removals.items() if f <= fraction)


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
    from .unstructured import expert_layer_masks

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
    from .structured import run_selection

    if calibration is None:
        raise ValueError("error curves measure block outputs on calibration data: pass calibration token ids [N, L]")
    layers = moe_layers(model)
    # removals chosen by the recipe's method, one selection per candidate fraction (counts per layer)
    fixed = dataclasses.replace(recipe, expert_sparsity=0.25, layer_budget="uniform", expert_merge="none")
    candidates = {layer.index: {0: list(range(layer.num_experts))} for layer in layers}
    passes = 0
    for f in REMOVAL_FRACTIONS[1:]:
        per_layer = {layer.index: layer.num_experts - _removal_at(f, removals[layer.index]) for layer in layers}
        todo = {i: k for i, k in per_layer.items() if layer_count(layers, i) - k not in candidates[i]}
        if not todo:
            continue
        selection = run_selection(model, fixed, calibration, plan=(sum(per_layer.values()), per_layer, min_keep), device=device, progress=progress)
        passes += selection.layer_passes
        for i, k in todo.items():
            candidates[i][layer_count(layers, i) - k] = selection.keep[i]

    errors: dict[int, dict[int, float]] = {}
    evaluations = 0

    def on_layer(i, moe, stats) -> bool:
        nonlocal evaluations
        if moe is None:
            return False
        errors[i] = layer_error_curve(moe, stats.block_inputs, stats.block_outputs, candidates[i], sparsity_of, recipe, stats)
        evaluations += len(candidates[i]) * len(stats.block_inputs)
        stats.block_inputs.clear()
        stats.block_outputs.clear()
        return False

    stats = calibrate(
        model, calibration, collect=get_metric(recipe.metric).collect(), batch_size=recipe.batch_size, device=device, on_layer=on_layer,
        keep_block_io=min(MAX_TOKENS, calibration.numel()), progress=progress, desc="expert error curves",
    )
    return candidates, errors, passes + stats.layer_passes, evaluations


def _removals(model: nn.Module, min_keep: dict[int, int]) -> dict[int, dict[float, int]]:
    n_group, topk_group = group_counts(model)
    return {layer.index: candidate_removals(layer.num_experts, min_keep[layer.index], n_group, topk_group, layer.top_k) for layer in moe_layers(model)}


def choose_split(
    model: nn.Module,
    recipe: StunRecipe,
    calibration: torch.Tensor,
    *,
    min_keep: dict[int, int],
    device: str | torch.device | None = None,
    progress: bool = False,
) -> SplitPlan:
    """Per-layer expert removals for ``recipe.total_sparsity`` (see the module docstring). Nothing is removed."""
    target = float(recipe.total_sparsity)
    layers = moe_layers(model)
    removals = {  # a removal that alone exceeds the target is not a candidate
        i: {f: r for f, r in found.items() if survivor_sparsity(target, layer_count(layers, i), layer_count(layers, i) - r) >= 0}
        for i, found in _removals(model, min_keep).items()
    }
    sparsity_of = lambda orig, kept: survivor_sparsity(target, orig, kept)  # noqa: E731
    candidates, errors, passes, evaluations = error_curves(
        model, recipe, calibration, removals, min_keep, sparsity_of, device=device, progress=progress
    )
    removed = {i: min(curve, key=lambda r: (curve[r], r)) for i, curve in errors.items()}
    keep = {i: candidates[i][r] for i, r in removed.items()}
    within = {i: max(0.0, survivor_sparsity(target, layer_count(layers, i), len(keep[i]))) for i in keep}
    return SplitPlan(target, keep, removed, within, errors, passes, evaluations, candidates)


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
        model, recipe, calibration, _removals(model, min_keep), min_keep, lambda orig, kept: within, device=device, progress=progress
    )
    removed = allocate_removals(errors, total, group_counts(model)[0])
    record = {"budget": "error_curve", "removed": removed, "errors": {i: {r: round(e, 6) for r, e in c.items()} for i, c in errors.items()},
              "block_evaluations": evaluations}
    return {layer.index: layer.num_experts - removed[layer.index] for layer in layers}, record, passes


def layer_count(layers: list[MoELayer], index: int) -> int:
    return next(layer.num_experts for layer in layers if layer.index == index)


__all__ = ["MAX_TOKENS", "REMOVAL_FRACTIONS", "SplitPlan", "allocate_removals", "block_output", "candidate_removals", "choose_budgets", "choose_split", "error_curves", "layer_error_curve", "survivor_sparsity"]
