"""The unstructured phase: keep-masks for the weights inside the surviving experts.

One implementation, called two ways:

* :func:`prune_weights`: one-shot ``prune()``, inside the streamed calibration pass (layer by layer;
  with ``recipe.sequential`` later layers calibrate on the already-pruned earlier ones, as Wanda);
* :func:`compute_masks`: ``StunCallback``'s mask updates, from the statistics of the training batches
  (``stun_lightning.activation_stats``) and the previous masks, which only grow.

Both go through the same per-layer steps: the low-token rule (:func:`low_token_experts`), the
metric's scores (:func:`expert_scores`, ``stun_lightning.metrics``), OWL's outlier ratio
(:func:`layer_outlier_ratio`), the layer targets (``stun_lightning.patterns.layer_targets``), the layer's
pattern (:func:`layer_pattern`) and its masks (:func:`expert_masks`, one expert at a time). Given the same statistics
and recipe, both therefore give the same masks (``tests/test_unstructured.py``).

Deviations from the official methods, named here because no paper states them:

* OWL's outlier ratio of a layer is computed over its expert matrices only (the official code, for
  dense models, counts every linear of the decoder layer; with ``prune_dense`` the dense linears get
  their layer's expert target);
* under OWL an N:M pattern becomes a per-layer ``N_l:M`` with ``N_l = round(target_l * M)`` clipped
  to ``[1, M-1]`` (OWL's own N:M variant), so the global sparsity is only approximately ``N/M``;
* per-layer targets are clipped to ``[0, 0.99]`` and the excess spread over the other layers so the
  parameter-weighted mean stays exact (``stun_lightning.patterns``);
* ``prune_dense`` masks every ``nn.Linear`` of each decoder layer except routers, which live inside
  the MoE block and are never pruned; Qwen2-MoE's ``shared_expert_gate`` (an ``nn.Linear`` of one
  output) is pruned with the dense linears.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .adapters import MoELayer, decoder_layers, moe_layers
from .calibration import LayerStats, calibrate, enter_layer, leave_layer
from .expert_masks import ExpertMasks
from .patterns import (
    InvalidSparsityError,
    layer_targets,
    mask_from_scores,
    nm_sparsity_for,
    outlier_ratio,
    parse_pattern,
)
from .metrics import get_metric, weighted_magnitude
from .recipe import StunRecipe
from .report import ModelCensus
from .sharding import full, is_sharded

ExpertScores = Iterator[tuple[str, int, torch.Tensor | None]]


# ------------------------------------------------------------------ checks and targets


def dense_linears(decoder_layer: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The dense linears of a decoder layer (attention, shared experts, dense MLP; routers are not ``nn.Linear``)."""
    return [(n, m) for n, m in decoder_layer.named_modules() if isinstance(m, nn.Linear)]


def check_pattern_shapes(model: nn.Module, pattern: str, include_dense: bool = False) -> None:
    """Refuse an N:M pattern whose M does not divide an input dimension it would be applied to."""
    nm = parse_pattern(pattern)
    if nm is None:
        return
    if include_dense:
        for i, decoder_layer in enumerate(decoder_layers(model)):
            for name, linear in dense_linears(decoder_layer):
                if linear.in_features % nm[1]:
                    raise InvalidSparsityError(
                        f"pattern {pattern} needs input dimensions divisible by {nm[1]}, but layer {i} {name} has "
                        f"{linear.in_features}; use pattern='unstructured' or prune_dense=False"
                    )
    for layer in moe_layers(model):
        for name, w in layer.expert_matrices().items():
            if w.shape[2] % nm[1]:
                raise InvalidSparsityError(
                    f"pattern {pattern} needs every expert matrix's input dimension divisible by {nm[1]}, but layer "
                    f"{layer.index} {name} has {w.shape[2]} inputs; use pattern='unstructured'"
                )


def within_sparsity(recipe: StunRecipe, before: ModelCensus, model: nn.Module) -> float:
    """Sparsity inside kept experts: the recipe's, or derived from ``total_sparsity`` STUN's way
    (``1 - total = (1 - removed expert params) * (1 - within)``; ``before``: the census before expert removal)."""
    if recipe.total_sparsity is None:
        return recipe.sparsity
    kept = (
        sum(p.numel() for layer in moe_layers(model) for _, p in layer.expert_parameters()) / before.expert_total.total
    )
    within = 1.0 - (1.0 - recipe.total_sparsity) / kept
    if within < 0:
        raise InvalidSparsityError(
            f"total_sparsity={recipe.total_sparsity} is below what expert removal already gives ({1 - kept:.3f}); raise it or lower expert_sparsity"
        )
    return within


# ------------------------------------------------------------------ one layer


def low_token_experts(stats: LayerStats | None, recipe: StunRecipe) -> list[int]:
    """Experts of the layer routed fewer than ``recipe.min_tokens`` tokens (none when the metric reads no data)."""
    if stats is None or not get_metric(recipe.metric).needs_data:
        return []
    return stats.low_token_experts(recipe.min_tokens)


def expert_scores(
    layer: MoELayer, weights: dict[str, torch.Tensor], stats: LayerStats | None, recipe: StunRecipe
) -> ExpertScores:
    """``(matrix, expert, scores [out, in] or None)`` for every expert matrix of ``layer``.

    ``weights``: the layer's expert matrices ``[E, out, in]`` (gathered when sharded). Experts under
    the low-token rule score by magnitude (``low_token_rule="magnitude"``) or get None: leave them as
    they are (``"dense"``, the official STUN behaviour)."""
    metric = get_metric(recipe.metric)
    if metric.needs_data and stats is None:
        raise ValueError(
            f"metric {recipe.metric!r} needs statistics for MoE layer {layer.index}; use metric='magnitude'"
        )
    low = set(low_token_experts(stats, recipe))
    for name, w in weights.items():
        channels = metric.expert_channels(stats, name) if metric.expert_channels is not None else None
        for e in range(layer.num_experts):
            if e not in low:
                yield name, e, weighted_magnitude(w[e], channels[e] if channels is not None else None)
            elif recipe.low_token_rule == "magnitude":
                yield name, e, weighted_magnitude(w[e])
            else:
                yield name, e, None


def layer_outlier_ratio(
    layer: MoELayer, weights: dict[str, torch.Tensor], stats: LayerStats | None, recipe: StunRecipe
) -> float:
    """OWL's outlier ratio of the layer's expert scores (streamed: never all held at once)."""
    return outlier_ratio(
        lambda: (sc for _, _, sc in expert_scores(layer, weights, stats, recipe) if sc is not None),
        recipe.owl_threshold,
    )


def layer_pattern(recipe: StunRecipe, target: float) -> str:
    """The pattern one layer is masked with: the recipe's, or under OWL the layer's own ``N_l:M``."""
    nm = parse_pattern(recipe.pattern)
    if nm is not None and recipe.allocation == "owl":
        return f"{nm_sparsity_for(target, nm[1])}:{nm[1]}"
    return recipe.pattern


def expert_masks(
    layer: MoELayer,
    weights: dict[str, torch.Tensor],
    stats: LayerStats | None,
    target: float,
    recipe: StunRecipe,
    previous: ExpertMasks | None = None,
) -> Iterator[tuple[str, int, torch.Tensor | None]]:
    """``(matrix, expert, keep-mask [out, in] or None)`` of every expert matrix of ``layer`` at ``target``,
    one expert at a time (None: keep every weight).

    With ``previous`` masks, already-masked weights rank below every live one (masks only grow), and
    experts the low-token rule leaves alone keep their previous mask. An expert's mask depends only on
    its own weights, so the caller may apply it before the next one is computed."""
    pattern = layer_pattern(recipe, target)
    for name, e, sc in expert_scores(layer, weights, stats, recipe):
        old = previous.get(layer.index, name) if previous is not None else None
        old = old[e].to(weights[name].device) if old is not None else None
        if sc is None:
            yield name, e, old
            continue
        if old is not None:
            sc = sc.masked_fill(~old.to(sc.device), -1.0)
        yield name, e, mask_from_scores(sc, target, pattern)


def expert_layer_masks(
    layer: MoELayer,
    weights: dict[str, torch.Tensor],
    stats: LayerStats | None,
    target: float,
    recipe: StunRecipe,
    previous: ExpertMasks | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks ``[E, out, in]`` of the layer's expert matrices at ``target`` (:func:`expert_masks`, gathered)."""
    masks = {name: torch.ones(w.shape, dtype=torch.bool, device=w.device) for name, w in weights.items()}
    for name, e, mask in expert_masks(layer, weights, stats, target, recipe, previous):
        if mask is not None:
            masks[name][e] = mask
    return masks


def dense_layer_masks(
    decoder_layer: nn.Module, stats: LayerStats | None, target: float, recipe: StunRecipe
) -> dict[str, torch.Tensor]:
    """Keep-masks of a decoder layer's dense linears (``prune_dense``) at its layer's ``target``."""
    metric = get_metric(recipe.metric)
    pattern = layer_pattern(recipe, target)
    out = {}
    for name, linear in dense_linears(decoder_layer):
        channels = (
            metric.dense_channels(stats, name) if metric.dense_channels is not None and stats is not None else None
        )
        out[name] = mask_from_scores(weighted_magnitude(linear.weight, channels), target, pattern)
    return out


def _full_matrices(layer: MoELayer) -> dict[str, torch.Tensor]:
    # one layer's whole expert weights (gathered when sharded: every rank, same order)
    return {name: full(w) for name, w in layer.expert_matrices().items()}


# ------------------------------------------------------------------ the whole model


@dataclass
class MaskUpdate:
    masks: ExpertMasks
    layer_targets: dict[int, float]
    low_token_experts: dict[int, list[int]]


@torch.no_grad()
def compute_masks(
    model: nn.Module,
    sparsity: float,
    recipe: StunRecipe,
    stats: dict[int, LayerStats] | None = None,
    *,
    previous: ExpertMasks | None = None,
    original_experts: dict[int, int] | None = None,
) -> MaskUpdate:
    """Keep-masks for every surviving expert matrix at within-expert ``sparsity`` with the recipe's
    metric, pattern, allocation and low-token rule (``recipe.sparsity`` is not read).

    ``stats``: per-MoE-layer statistics (from ``ActivationStats``; needed unless the metric is
    ``magnitude``). ``previous``: the masks in force, which the new ones contain. ``original_experts``:
    expert counts before removal (for ``allocation_base="layer"``). Sharded layers are gathered one
    at a time (a collective: every rank computes the same masks)."""
    layers = moe_layers(model)
    if get_metric(recipe.metric).needs_data:
        if stats is None:
            raise ValueError(
                f"metric {recipe.metric!r} needs activation statistics (stats=...) or use metric='magnitude'"
            )
        missing = [layer.index for layer in layers if layer.index not in stats]
        if missing:
            raise ValueError(f"no activation statistics for MoE layer(s) {missing}")
    layer_stats = {layer.index: stats.get(layer.index) if stats is not None else None for layer in layers}

    ratios = None
    if recipe.allocation == "owl":
        ratios = {
            layer.index: layer_outlier_ratio(layer, _full_matrices(layer), layer_stats[layer.index], recipe)
            for layer in layers
        }
    targets = layer_targets(
        layers,
        sparsity,
        parse_pattern(recipe.pattern),
        ratios,
        recipe.owl_lambda,
        recipe.weight_allocation_base,
        original_experts,
    )

    out, low_tokens = ExpertMasks(), {}
    for layer in layers:
        s = layer_stats[layer.index]
        if low := low_token_experts(s, recipe):
            low_tokens[layer.index] = low
        masks = expert_layer_masks(layer, _full_matrices(layer), s, targets[layer.index], recipe, previous)
        sharded = is_sharded(layer.experts.gate_up_proj)
        for name, m in masks.items():
            out.set(layer.index, name, m.cpu() if sharded else m)
    return MaskUpdate(out, targets, low_tokens)


@torch.no_grad()
def prune_weights(
    model: nn.Module,
    recipe: StunRecipe,
    within: float,
    calibration: torch.Tensor | None,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
    original_experts: dict[int, int] | None = None,
) -> tuple[dict[int, float], dict[int, list[int]], int]:
    """Mask ``model``'s expert weights (and dense linears with ``recipe.prune_dense``) in place at
    within-expert sparsity ``within``, calibrating on ``calibration`` when the metric needs data.

    Returns (layer targets, low-token experts per layer, decoder-layer passes)."""
    metric = get_metric(recipe.metric)
    layers = {layer.index: layer for layer in moe_layers(model)}
    all_layers = decoder_layers(model)
    n_passes = 0

    def each_layer(on_layer, desc: str, collect: tuple[str, ...]) -> None:
        nonlocal n_passes
        if metric.needs_data:
            stats = calibrate(
                model,
                calibration,
                collect=collect,
                batch_size=recipe.batch_size,
                device=device,
                on_layer=on_layer,
                progress=progress,
                desc=desc,
            )
            n_passes += stats.layer_passes
        else:
            for i in range(len(all_layers)):
                enter_layer(i, all_layers[i], None)
                on_layer(i, layers.get(i), None)
                leave_layer(i, all_layers[i], None)

    ratios = None
    if recipe.allocation == "owl":
        ratios = {}

        def measure(i: int, layer: MoELayer | None, stats: LayerStats | None) -> bool:
            if layer is not None:
                ratios[i] = layer_outlier_ratio(layer, layer.expert_matrices(), stats, recipe)
            return False

        each_layer(measure, "OWL outlier ratios", metric.collect())
    targets = layer_targets(
        list(layers.values()),
        within,
        parse_pattern(recipe.pattern),
        ratios,
        recipe.owl_lambda,
        recipe.weight_allocation_base,
        original_experts,
    )

    low_tokens: dict[int, list[int]] = {}

    def prune_layer(i: int, layer: MoELayer | None, stats: LayerStats | None) -> bool:
        if layer is None and not recipe.prune_dense:
            return False
        target = targets.get(i, within)
        if layer is not None:
            if low := low_token_experts(stats, recipe):
                low_tokens[i] = low
            weights = layer.expert_matrices()
            # each expert's mask applied as it comes: no float copy of the layer's masks (a streamed prune's peak)
            for name, e, mask in expert_masks(layer, weights, stats, target, recipe):
                if mask is not None:
                    weights[name][e].mul_(mask.to(weights[name].dtype))
        if recipe.prune_dense:
            linears = dict(dense_linears(all_layers[i]))
            for name, mask in dense_layer_masks(all_layers[i], stats, target, recipe).items():
                linears[name].weight.mul_(mask.to(linears[name].weight.dtype))
        return recipe.sequential

    each_layer(prune_layer, "pruning weights", metric.collect(recipe.prune_dense))
    return targets, low_tokens, n_passes


def mask_survivors(
    model: nn.Module,
    recipe: StunRecipe,
    before: ModelCensus,
    calibration: torch.Tensor | None,
    *,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> tuple[dict[int, float], dict[int, list[int]], int]:
    """``prune()``'s unstructured phase after expert removal: :func:`prune_weights` at the recipe's
    within-expert sparsity (:func:`within_sparsity`; ``before``: the census of the dense model)."""
    within = within_sparsity(recipe, before, model)
    return prune_weights(
        model, recipe, within, calibration, device=device, progress=progress, original_experts=before.num_experts
    )


__all__ = [
    "MaskUpdate",
    "check_pattern_shapes",
    "compute_masks",
    "dense_layer_masks",
    "dense_linears",
    "expert_layer_masks",
    "expert_masks",
    "expert_scores",
    "layer_outlier_ratio",
    "layer_pattern",
    "low_token_experts",
    "mask_survivors",
    "prune_weights",
    "within_sparsity",
]
