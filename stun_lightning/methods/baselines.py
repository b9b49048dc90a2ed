"""Simple expert-pruning baselines through the same interface as STUN."""

from __future__ import annotations

import torch

from .base import SelectionContext, register_expert_method, select_by_scores


@register_expert_method("frequency", needs="routing")
def frequency(ctx: SelectionContext) -> dict[int, list[int]]:
    """Keep the experts with the largest router-weighted frequency (sum of gate values over the
    calibration tokens, as in REAP's frequency baseline but gate-weighted)."""
    scores = {layer.index: ctx.stats[layer.index].gate_sum.clone() for layer in ctx.layers}
    return select_by_scores(scores, ctx)


@register_expert_method("random")
def random(ctx: SelectionContext) -> dict[int, list[int]]:
    """Keep a uniformly random set of experts (seeded by ``ctx.seed``)."""
    gen = torch.Generator().manual_seed(ctx.seed)
    scores = {layer.index: torch.rand(layer.num_experts, generator=gen, dtype=torch.float64) for layer in ctx.layers}
    return select_by_scores(scores, ctx)
