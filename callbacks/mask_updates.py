"""StunCallback's unstructured phase: the final within-expert target, the schedule fitted to the fit,
and one mask update.

An update reads the activation statistics of the training batches just before it (the
``stats_steps`` window of :class:`stun_lightning.activation_stats.ActivationStats`), sums them
across ranks, and recomputes the masks at the schedule's sparsity (``stun_lightning.expert_masks``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from stun_lightning.activation_stats import ActivationStats, reduce_stats
from stun_lightning.expert_masks import ExpertMasks
from stun_lightning.patterns import InvalidSparsityError, parse_pattern
from stun_lightning.recipe import StunRecipe
from stun_lightning.report import ModelCensus
from stun_lightning.schedule import InvalidScheduleError, SparsitySchedule
from stun_lightning.unstructured import MaskUpdate, compute_masks, within_sparsity


def final_sparsity(recipe: StunRecipe, schedule: SparsitySchedule, dense: ModelCensus, model: nn.Module) -> float:
    """The schedule's final within-expert sparsity for ``model`` after expert removal (``dense``:
    the census before it), from ``schedule.final``, the N:M pattern or the recipe's target."""
    if schedule.final is not None:
        return schedule.final
    nm = parse_pattern(recipe.pattern)
    if nm is not None:
        return nm[0] / nm[1]
    return within_sparsity(recipe, dense, model)  # total_sparsity turned into a within-expert target as prune() does


def fitted_schedule(schedule: SparsitySchedule, final: float, total_steps: int) -> SparsitySchedule:
    """``schedule`` resolved to reach ``final`` by its ``end_step`` (default: the fit's last optimizer
    step, ``total_steps``); InvalidScheduleError when it ends after the fit or does not fit the recipe."""
    end = schedule.end_step if schedule.end_step is not None else total_steps
    if end > total_steps:
        raise InvalidScheduleError(
            f"schedule end_step={end} is after the fit's last optimizer step ({total_steps}): the final sparsity would "
            "never be reached; lower end_step or train longer"
        )
    try:
        return schedule.resolved(final, end)
    except (InvalidScheduleError, InvalidSparsityError) as err:
        raise InvalidScheduleError(f"schedule does not fit this recipe: {err}") from err


def window_statistics(
    window: ActivationStats | None,
    needed: bool,
    metric: str,
    step: int,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict | None:
    """Close the statistics window (if open) and return what it collected, summed with
    ``reduce_sum`` (across ranks) when given; ``needed``: raise when it saw no tokens."""
    stats = None
    if window is not None and window.is_open:
        seen = window.tokens_seen()
        stats = window.close()
    else:
        seen = 0
    if needed:
        if stats is None or seen == 0:
            raise RuntimeError(
                f"metric {metric!r} needs activation statistics at step {step}, but the forward hooks on "
                "the experts saw no training tokens (does the model's forward bypass its experts module, or run "
                "in eval mode?); use metric='magnitude'"
            )
        if reduce_sum is not None:
            stats = reduce_stats(stats, reduce_sum)
    return stats


def masks_at(
    model: nn.Module,
    target: float,
    recipe: StunRecipe,
    stats: dict | None,
    previous: ExpertMasks | None,
    original_experts: dict[int, int] | None = None,
) -> MaskUpdate:
    """Keep-masks of the surviving experts at ``target`` with the recipe's metric, pattern and
    allocation (``original_experts``: expert counts before the structured phase)."""
    return compute_masks(model, target, recipe, stats, previous=previous, original_experts=original_experts)
