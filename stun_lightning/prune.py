"""``prune(model, recipe, calibration)``: STUN's structured-then-unstructured pipeline in one call."""

from __future__ import annotations

import time

import torch
from torch import nn

from .methods import get_expert_method
from .metrics import get_metric
from .recipe import StunRecipe
from .report import ModelCensus, PruneReport
from .structured import apply_expert_sets, needs_calibration, plan_expert_counts, run_selection
from .unstructured import check_pattern_shapes, mask_survivors


def check_recipe(model: nn.Module, recipe: StunRecipe) -> tuple[int, dict[int, int] | None, dict[int, int]]:
    """Every check that can refuse ``recipe`` on ``model`` before any work; returns the expert plan."""
    recipe.validate()
    plan = plan_expert_counts(model, recipe)
    check_pattern_shapes(model, recipe.pattern, recipe.prune_dense)
    if (
        plan[1] is None
        and not recipe.auto_split
        and recipe.layer_budget != "error_curve"
        and not get_expert_method(recipe.expert_method).supports_global
    ):
        raise ValueError(f"method {recipe.expert_method!r} needs layer_budget='uniform'")
    return plan


def resolve_calibration(recipe: StunRecipe, calibration: torch.Tensor | None, tokenizer) -> torch.Tensor | None:
    """``calibration``, or blocks of the shipped calibration text from ``tokenizer`` when the recipe
    needs data and none was given (``prune()`` and ``prune_streaming()``); an error names the fix."""
    data_needed = needs_calibration(recipe) or (recipe.prunes_weights and get_metric(recipe.metric).needs_data)
    if data_needed and calibration is None:
        if tokenizer is None:
            raise ValueError("this recipe needs calibration data: pass calibration=token ids [N, L] or tokenizer=...")
        from .data import calibration_blocks

        calibration = calibration_blocks(
            tokenizer, None, recipe.calibration_samples, recipe.calibration_seq_len, recipe.seed
        )
    return calibration


def prune(
    model: nn.Module,
    recipe: StunRecipe | None = None,
    calibration: torch.Tensor | None = None,
    *,
    tokenizer=None,
    device: str | torch.device | None = None,
    progress: bool = True,
    record_figures: bool = False,
) -> PruneReport:
    """Prune ``model`` in place: remove experts, then mask weights inside the survivors.

    Args:
        recipe: default :meth:`StunRecipe.default` (the recommended ``auto`` split at 55% total);
            ``StunRecipe()`` field defaults are STUN's official recipe instead.
        calibration: token ids ``[N, L]``; if None and the recipe needs data, ``tokenizer`` is used
            to cut the package's shipped calibration text into ``recipe.calibration_samples`` windows.
        device: where calibration runs, one decoder layer at a time (default: the model's device).
        record_figures: also measure what ``stun-lightning report`` draws (routing frequency before
            and after on the calibration tokens, STUN's distance table, per-expert sparsity) into
            ``report.figures``; costs two routing passes (see :mod:`stun_lightning.figures`).
    Returns a :class:`PruneReport` counted from the pruned tensors.
    """
    recipe = (recipe or StunRecipe.default()).validate()
    keep_total, per_layer, min_keep = check_recipe(model, recipe)
    calibration = resolve_calibration(recipe, calibration, tokenizer)

    before = ModelCensus.of(model)
    seconds, passes, removed, split = {}, {}, {}, {}
    figures = {}
    if record_figures:
        from . import figures as fig

        if calibration is not None:
            figures["routing_before"] = fig.routing_frequency(
                model, calibration, batch_size=recipe.batch_size, device=device
            )
        if recipe.removes_experts and not recipe.auto_split and recipe.expert_method == "stun":
            figures["distances"] = fig.stun_distances(model, recipe, calibration, device=device)

    # Structured phase.
    candidate = None  # auto by model_loss: the scored candidate, whose masks the unstructured phase applies
    if recipe.removes_experts:
        start = time.perf_counter()
        selection = run_selection(
            model, recipe, calibration, plan=(keep_total, per_layer, min_keep), device=device, progress=progress
        )
        if selection.layer_passes:
            passes["structured"] = selection.layer_passes
        split, candidate = selection.split or {}, selection.candidate
        removed = apply_expert_sets(
            model, selection.keep, lower_top_k=recipe.lower_top_k, merge_mass=selection.merge_mass
        )
        seconds["structured"] = time.perf_counter() - start

    # Unstructured phase.
    targets, low_tokens = {}, {}
    if recipe.prunes_weights:
        start = time.perf_counter()
        if candidate is not None:  # exactly the pruned model that was scored (its passes: "structured")
            candidate.apply_masks(model)
            targets, low_tokens = dict(candidate.layer_targets), dict(candidate.low_token_experts)
        else:
            targets, low_tokens, passes["unstructured"] = mask_survivors(
                model, recipe, before, calibration, device=device, progress=progress
            )
        seconds["unstructured"] = time.perf_counter() - start

    if record_figures:
        figures["expert_sparsity"] = fig.to_original(fig.expert_sparsity(model), removed, before.num_experts)
        if calibration is not None:
            after = fig.routing_frequency(model, calibration, batch_size=recipe.batch_size, device=device)
            figures["routing_after"] = fig.to_original(after, removed, before.num_experts)
    return PruneReport.compare(
        before,
        ModelCensus.of(model),
        recipe.to_dict(),
        removed,
        layer_target_sparsity=targets,
        low_token_experts=low_tokens,
        seconds=seconds,
        layer_passes=passes,
        figures=figures,
        expert_split=split,
    )
