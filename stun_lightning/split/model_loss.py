"""``split_criterion="model_loss"``: candidates pruned on a trial copy and scored by next-token loss
on held-out calibration blocks."""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from ..adapters import decoder_layers, moe_layers
from ..evaluate import block_nll
from ..recipe import StunRecipe
from ..report import ModelCensus
from ..structured import ExpertSelection, apply_expert_sets
from ..unstructured import dense_linears, mask_survivors
from .plan import SplitPlan, removals_within_target, select_at_counts, uniform_candidates, survivor_sparsities


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


def trial_copy(model: nn.Module, prune_dense: bool = False) -> nn.Module:
    """A copy of ``model`` that owns its experts' and routers' tensors (and with ``prune_dense`` the
    weights of every dense linear) and shares every other tensor with ``model``: surgery and masks
    on the copy leave ``model`` as it is, for one extra copy of the expert weights."""
    owned = {
        id(t)
        for layer in moe_layers(model)
        for module in (layer.experts, layer.router)
        for t in itertools.chain(module.parameters(), module.buffers())
    }
    if prune_dense:
        owned |= {
            id(linear.weight) for decoder_layer in decoder_layers(model) for _, linear in dense_linears(decoder_layer)
        }
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers()) if id(t) not in owned}
    return copy.deepcopy(model, shared)


def candidate_loss(
    model: nn.Module,
    recipe: StunRecipe,
    selection: ExpertSelection,
    statistics: torch.Tensor,
    held_out: torch.Tensor,
    *,
    device: str | torch.device | None = None,
) -> tuple[float, int]:
    """(held-out NLL of ``model`` pruned as ``prune()`` prunes it with the experts of ``selection``,
    decoder-layer passes spent), on a :func:`trial_copy`; ``model`` is left as it is. The masks
    calibrate layer by layer on ``device``; the held-out forward runs the whole copy where its
    embedding lives."""
    before = ModelCensus.of(model)
    trial = trial_copy(model, recipe.prune_dense)
    apply_expert_sets(trial, selection.keep, lower_top_k=recipe.lower_top_k, merge_mass=selection.merge_mass)
    passes = 0
    if recipe.prunes_weights:
        passes = mask_survivors(trial, recipe, before, statistics, device=device, progress=False)[2]
    return block_nll(trial, held_out, recipe.batch_size, device), passes + len(decoder_layers(trial))


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
    next-token loss on held-out calibration blocks (see the module docstring)."""
    target = float(recipe.total_sparsity)
    layers = moe_layers(model)
    statistics, held_out = held_out_blocks(calibration, recipe.split_held_out)
    candidates = uniform_candidates(layers, removals_within_target(model, target, min_keep))
    losses, tried, keeps, passes = {}, {}, {}, 0
    for f, counts in candidates.items():
        if any(counts.values()):
            per_layer = {layer.index: layer.num_experts - counts[layer.index] for layer in layers}
            selection = select_at_counts(
                model, recipe, statistics, per_layer, min_keep, device=device, progress=progress
            )
        else:
            selection = ExpertSelection({layer.index: list(range(layer.num_experts)) for layer in layers})
        losses[f], spent = candidate_loss(model, recipe, selection, statistics, held_out, device=device)
        tried[f], keeps[f] = counts, selection.keep
        passes += selection.layer_passes + spent
        if rose_twice(list(losses.values())):
            break
    best = min(losses, key=lambda f: (losses[f], sum(tried[f].values())))
    return SplitPlan(
        target,
        keeps[best],
        dict(tried[best]),
        survivor_sparsities(target, layers, keeps[best]),
        layer_passes=passes,
        criterion="model_loss",
        losses=losses,
        tried=tried,
        held_out_blocks=held_out.shape[0],
    )
