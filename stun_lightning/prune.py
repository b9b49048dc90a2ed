"""``prune(model, recipe, calibration)``: STUN's structured-then-unstructured pipeline in one call."""

from __future__ import annotations

import time

import torch
from torch import nn

from .adapters import MoELayer, decoder_layers, moe_layers
from .calibration import LINEAR, NORMS, LayerStats, calibrate
from .masks import InvalidSparsityError, layer_targets, mask_from_scores, nm_sparsity_for, outlier_ratio, parse_pattern, score
from .methods import get_expert_method
from .recipe import StunRecipe
from .report import ModelCensus, PruneReport
from .structured import apply_expert_sets, needs_calibration, plan_expert_counts, run_selection


def dense_linears(decoder_layer: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The dense linears of a decoder layer (attention, shared experts, dense MLP)."""
    return [(n, m) for n, m in decoder_layer.named_modules() if isinstance(m, nn.Linear)]


def check_pattern_shapes(model: nn.Module, pattern: str, include_dense: bool = False) -> None:
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


def check_recipe(model: nn.Module, recipe: StunRecipe) -> tuple[int, dict[int, int] | None, dict[int, int]]:
    """Every check that can refuse ``recipe`` on ``model`` before any work; returns the expert plan."""
    recipe.validate()
    plan = plan_expert_counts(model, recipe)
    check_pattern_shapes(model, recipe.pattern, recipe.prune_dense)
    if plan[1] is None and not get_expert_method(recipe.expert_method).supports_global:
        raise ValueError(f"method {recipe.expert_method!r} needs layer_budget='uniform'")
    return plan


def prune(
    model: nn.Module,
    recipe: StunRecipe | None = None,
    calibration: torch.Tensor | None = None,
    *,
    tokenizer=None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> PruneReport:
    """Prune ``model`` in place: remove experts, then mask weights inside the survivors.

    Args:
        calibration: token ids ``[N, L]``; if None and the recipe needs data, ``tokenizer`` is used
            to cut the package's shipped calibration text into ``recipe.calibration_samples`` windows.
        device: where calibration runs, one decoder layer at a time (default: the model's device).
    Returns a :class:`PruneReport` counted from the pruned tensors.
    """
    recipe = (recipe or StunRecipe()).validate()
    keep_total, per_layer, min_keep = check_recipe(model, recipe)
    data_needed = needs_calibration(recipe) or (recipe.prunes_weights and recipe.metric != "magnitude")
    if data_needed and calibration is None:
        if tokenizer is None:
            raise ValueError("this recipe needs calibration data: pass calibration=token ids [N, L] or tokenizer=...")
        from .data import calibration_blocks

        calibration = calibration_blocks(tokenizer, None, recipe.calibration_samples, recipe.calibration_seq_len, recipe.seed)

    before = ModelCensus.of(model)
    seconds, passes, removed = {}, {}, {}

    # Structured phase.
    if recipe.expert_sparsity > 0:
        start = time.perf_counter()
        keep, n_passes = run_selection(model, recipe, calibration, plan=(keep_total, per_layer, min_keep), device=device, progress=progress)
        if n_passes:
            passes["structured"] = n_passes
        removed = apply_expert_sets(model, keep, lower_top_k=recipe.lower_top_k)
        seconds["structured"] = time.perf_counter() - start

    # Unstructured phase.
    targets, low_tokens = {}, {}
    if recipe.prunes_weights:
        start = time.perf_counter()
        within = within_sparsity(recipe, before, model)
        targets, low_tokens, n_passes = _prune_weights(model, recipe, within, calibration, device, progress, before.num_experts)
        passes["unstructured"] = n_passes
        seconds["unstructured"] = time.perf_counter() - start

    return PruneReport.compare(
        before,
        ModelCensus.of(model),
        recipe.to_dict(),
        removed,
        layer_target_sparsity=targets,
        low_token_experts=low_tokens,
        seconds=seconds,
        layer_passes=passes,
    )


def within_sparsity(recipe: StunRecipe, before: ModelCensus, model: nn.Module) -> float:
    """Sparsity inside kept experts: the recipe's, or derived from total_sparsity STUN's way."""
    if recipe.total_sparsity is None:
        return recipe.sparsity
    kept = ModelCensus.of(model).expert_total.total / before.expert_total.total
    within = 1.0 - (1.0 - recipe.total_sparsity) / kept
    if within < 0:
        raise InvalidSparsityError(
            f"total_sparsity={recipe.total_sparsity} is below what expert removal already gives ({1 - kept:.3f}); raise it or lower expert_sparsity"
        )
    return within


def _matrix_scores(layer: MoELayer, stats: LayerStats | None, metric: str, low: set[int], rule: str):
    """Yield (expert, matrix name, [out, in] weight view, scores or None to leave dense)."""
    gated = metric == "moe_pruner"
    for name, weights in layer.expert_matrices().items():
        norms = stats.input_norms(name, gated) if stats is not None and metric != "magnitude" else None
        for e in range(layer.num_experts):
            if e in low:
                if rule == "dense":
                    yield e, name, weights[e], None
                    continue
                yield e, name, weights[e], score(weights[e], "magnitude")
            else:
                yield e, name, weights[e], score(weights[e], metric, norms[e] if norms is not None else None)


def _prune_weights(model, recipe: StunRecipe, within: float, calibration, device, progress, original_experts: dict[int, int]):
    layers = {layer.index: layer for layer in moe_layers(model)}
    nm = parse_pattern(recipe.pattern)
    uses_data = recipe.metric != "magnitude"
    low_tokens: dict[int, list[int]] = {}
    n_passes = 0

    def low_set(i: int, stats: LayerStats | None) -> set[int]:
        if stats is None:
            return set()
        low = stats.low_token_experts(recipe.min_tokens)
        if low:
            low_tokens[i] = low
        return set(low)

    ratios = None  # outlier ratios, for OWL
    if recipe.allocation == "owl":
        ratios = {}

        def measure(i: int, layer: MoELayer | None, stats: LayerStats | None) -> bool:
            if layer is not None:
                low = low_set(i, stats)
                ratios[i] = outlier_ratio(
                    lambda: (sc for *_, sc in _matrix_scores(layer, stats, recipe.metric, low, recipe.low_token_rule) if sc is not None),
                    recipe.owl_threshold,
                )
            return False

        if uses_data:
            stats = calibrate(model, calibration, collect=(NORMS,), batch_size=recipe.batch_size, device=device, on_layer=measure, progress=progress, desc="OWL outlier ratios")
            n_passes += stats.layer_passes
        else:
            for i, layer in layers.items():
                measure(i, layer, None)
        low_tokens.clear()
    targets = layer_targets(list(layers.values()), within, nm, ratios, recipe.owl_lambda, recipe.allocation_base, original_experts)

    all_layers = decoder_layers(model)

    def prune_layer(i: int, layer: MoELayer | None, stats: LayerStats | None) -> bool:
        if layer is None and not recipe.prune_dense:
            return False
        target = targets.get(i, within)
        pattern = recipe.pattern
        if nm and recipe.allocation == "owl" and i in targets:
            pattern = f"{nm_sparsity_for(target, nm[1])}:{nm[1]}"
        with torch.no_grad():
            if layer is not None:
                for _, _, weight, scores in _matrix_scores(layer, stats, recipe.metric, low_set(i, stats), recipe.low_token_rule):
                    if scores is not None:
                        weight.mul_(mask_from_scores(scores, target, pattern).to(weight.dtype))
            if recipe.prune_dense:
                for name, linear in dense_linears(all_layers[i]):
                    norms = stats.linear_sq[name].sqrt() if uses_data else None
                    scores = score(linear.weight, "wanda" if uses_data else "magnitude", norms)
                    linear.weight.mul_(mask_from_scores(scores, target, pattern).to(linear.weight.dtype))
        return recipe.sequential

    if uses_data:
        collect = (NORMS, LINEAR) if recipe.prune_dense else (NORMS,)
        stats = calibrate(model, calibration, collect=collect, batch_size=recipe.batch_size, device=device, on_layer=prune_layer, progress=progress, desc="pruning weights")
        n_passes += stats.layer_passes
    else:
        for i in range(len(all_layers)):
            prune_layer(i, layers.get(i), None)
    return targets, low_tokens, n_passes
