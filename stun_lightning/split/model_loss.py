"""``split_criterion="model_loss"``: candidates pruned on a trial copy and scored by next-token loss
on held-out calibration blocks."""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import moe_layers
from ..recipe import StunRecipe
from ..structured import ExpertSelection
from .candidate import Scored, score_candidate
from .plan import SplitPlan, removals_within_target, select_at_counts, survivor_sparsities, uniform_candidates
from .refine import beats_margin, layer_groups, paired_gain, refine_counts


def held_out_blocks(calibration: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(statistics blocks, held-out blocks) of calibration ids ``[N, L]``: the last
    ``max(1, int(N * fraction))`` blocks are held out."""
    if calibration is None:
        raise ValueError(
            "split_criterion='model_loss' scores candidates on held-out calibration blocks: pass calibration token ids [N, L]"
        )
    n = calibration.shape[0]
    held = max(1, int(n * fraction))
    if held >= n:
        raise ValueError(
            f"split_criterion='model_loss' holds out {held} of {n} calibration blocks: pass more blocks, lower split_held_out "
            "or use split_criterion='block_error'"
        )
    return calibration[:-held], calibration[-held:]


def removes_more_for_less(best: torch.Tensor, candidate: torch.Tensor, margin: float) -> bool:
    """Whether a uniform candidate that removes more experts replaces the best so far (fractions are
    tried from 0 up): its held-out per-block loss gain must beat ``margin`` paired standard errors, as
    a refinement move must (:func:`stun_lightning.split.refine.beats_margin`; ``margin=0``: any
    lower loss). Ours: a removal the held-out blocks cannot tell from noise is not taken."""
    return beats_margin(*paired_gain(best, candidate), margin)


def rose_twice(losses: list[float]) -> bool:
    """Whether the last two losses each rose over the one before (the early stop of ``model_loss``)."""
    return len(losses) >= 3 and losses[-3] < losses[-2] < losses[-1]


def choose_split_by_loss(
    model: nn.Module,
    recipe: StunRecipe,
    calibration: torch.Tensor,
    *,
    min_keep: dict[int, int],
    device: str | torch.device | None = None,
    progress: bool = False,
) -> SplitPlan:
    """``split_criterion="model_loss"``: the uniform removal fraction whose pruned model has the least
    next-token loss on held-out calibration blocks, then with ``recipe.split_groups > 1`` refined
    group by group (:mod:`stun_lightning.split.refine`). At most ``len(REMOVAL_FRACTIONS) + 2 *
    split_groups`` (5 + 2 * groups) pruned copies are scored, whatever the expert count; the plan
    carries the chosen one's :class:`Candidate` so that ``prune()`` applies exactly what was scored."""
    target = float(recipe.total_sparsity)
    layers = moe_layers(model)
    statistics, held_out = held_out_blocks(calibration, recipe.split_held_out)
    options = removals_within_target(model, target, min_keep)
    passes = 0

    def score(counts: dict[int, int]) -> Scored:
        nonlocal passes
        if any(counts.values()):
            per_layer = {layer.index: layer.num_experts - counts[layer.index] for layer in layers}
            selection = select_at_counts(
                model, recipe, statistics, per_layer, min_keep, device=device, progress=progress
            )
        else:
            selection = ExpertSelection({layer.index: list(range(layer.num_experts)) for layer in layers})
        scored = score_candidate(model, recipe, selection, statistics, held_out, device=device)
        passes += selection.layer_passes + scored.passes
        return scored

    uniform = uniform_candidates(layers, options)
    losses, tried, best = {}, {}, None
    for f, counts in uniform.items():
        scored = score(counts)
        losses[f], tried[f] = scored.loss, counts
        if best is None or removes_more_for_less(best[1].block_losses, scored.block_losses, recipe.split_margin):
            best = (f, scored)  # the candidate before it is released: one kept at a time
        if rose_twice(list(losses.values())):
            break
    fraction, chosen = best
    counts, moves = dict(tried[fraction]), []
    if recipe.split_groups > 1:
        steps = {i: sorted(set(found.values())) for i, found in options.items()}
        groups = layer_groups([layer.index for layer in layers], recipe.split_groups)
        counts, chosen, moves = refine_counts(counts, steps, groups, score, chosen, recipe.split_margin)
    keep = chosen.candidate.keep
    return SplitPlan(
        target,
        keep,
        counts,
        survivor_sparsities(target, layers, keep),
        layer_passes=passes,
        criterion="model_loss",
        losses=losses,
        tried=tried,
        held_out_blocks=held_out.shape[0],
        uniform=fraction,
        moves=moves,
        candidate=chosen.candidate,
    )
