"""NAEE expert pruning: per layer, enumerate every expert subset and keep the best reconstruction.

Lu et al., "Not All Experts are Equal: Efficient Expert Pruning and Skipping for Mixture-of-Experts
Large Language Models" (ACL 2024; Lucky-Lance/Expert_Sparsity @16067c0). Per MoE layer, on the
inputs X the layer receives in the unpruned model: for every drop-set D of size E - r, D's router
logits are forced to -inf, the router's own softmax / top-k / renormalisation run, and the block
output Z' is compared with the unpruned output Z; loss = sum over calibration batches of
``||Z - Z'||_F`` in fp64 (not squared); the argmin subset is kept (ties: the first subset in
``itertools.combinations`` order, as ``min`` over the official dict).

Options (``method_options``): ``max_subsets`` (default 1e5): refuse any layer whose enumeration
needs more subsets; ``progressive`` (default False): later layers see inputs from already pruned
earlier layers (the official ``progressive_pruning``); ``max_tokens``: cap on calibration tokens
per layer (default all).

Deviations, none of which changes the argmin up to rounding:
* Z - Z' differs only in the routed experts' weighted sum (shared experts and everything else in
  the block ignore the drop-set), so each expert's output is computed once per calibration batch
  and every subset only re-runs the router and recombines those outputs, instead of re-running the
  whole block C(E, r) times. The official cost, C(E, r) block evaluations per layer, is what
  :func:`naee_subsets` reports and what the limit counts.
* Any family, not only Mixtral. Masking logits equals removing the experts for softmax routers
  with or without top-k renormalisation and for GPT-OSS. For expert-group routers (DeepSeek-V3) it
  does only when each group loses the same number of experts, so only those subsets are
  enumerated (C(E/g, r/g)^g of them).
* Needs the same count in every layer (``layer_budget="uniform"``), as the official ``r``.

Dynamic skipping, NAEE's inference-time half, is :mod:`stun_lightning.skipping`.
"""

from __future__ import annotations

import itertools
import math

import torch

from ..adapters import MoELayer
from ..routing import router_logits_forced_to_minus_inf
from .base import SelectionContext, register_expert_method

DEFAULT_MAX_SUBSETS = 100_000


class EnumerationTooLargeError(ValueError):
    """NAEE would need more subset evaluations than allowed."""


def _groups(layer: MoELayer, model) -> int:
    field = layer.adapter.group_field
    return int(getattr(model.config, field, None) or 1) if field else 1


def naee_subsets(num_experts: int, keep: int, groups: int = 1) -> int:
    """Subsets NAEE evaluates in one layer (= MoE-block evaluations over the calibration set)."""
    if groups > 1:
        return math.comb(num_experts // groups, keep // groups) ** groups
    return math.comb(num_experts, keep)


def check_enumeration(ctx: SelectionContext, max_subsets: float | None = None) -> dict[int, int]:
    """Subsets per layer; raises EnumerationTooLargeError before any work if a layer is over the limit."""
    if ctx.keep_per_layer is None:
        raise ValueError("NAEE keeps the same number of experts in every layer: use layer_budget='uniform'")
    limit = DEFAULT_MAX_SUBSETS if max_subsets is None else max_subsets
    counts = {
        layer.index: naee_subsets(layer.num_experts, ctx.keep_per_layer[layer.index], _groups(layer, ctx.model))
        for layer in ctx.layers
    }
    over = {i: n for i, n in counts.items() if n > limit}
    if over:
        i, n = next(iter(over.items()))
        layer = next(lay for lay in ctx.layers if lay.index == i)
        raise EnumerationTooLargeError(
            f"NAEE would evaluate C({layer.num_experts}, {ctx.keep_per_layer[i]}) = {n:.3g} expert subsets in layer {i} "
            f"({sum(counts.values()):.3g} MoE-block forward passes over the calibration set in all layers), above "
            f"max_subsets={limit:.3g}. Use a method whose cost does not grow with the expert count (expert_method='stun'), "
            "keep more experts, or raise method_options['max_subsets'] if you really mean to wait."
        )
    return counts


def _candidate_drops(layer: MoELayer, keep: int, groups: int):
    E = layer.num_experts
    if groups == 1:
        yield from itertools.combinations(range(E), E - keep)
        return
    size, drop_per_group = E // groups, (E - keep) // groups
    per_group = [list(itertools.combinations(range(g * size, (g + 1) * size), drop_per_group)) for g in range(groups)]
    for parts in itertools.product(*per_group):
        yield tuple(e for part in parts for e in part)


@torch.no_grad()
def _routed_sum(outs: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """sum_k weights[t, k] * outs[index[t, k], t] in fp64 (``outs`` [E, T, H]; index E = empty slot)."""
    E, T = outs.shape[0], outs.shape[1]
    valid = index < E
    tok = torch.arange(T, device=outs.device)[:, None].expand_as(index)
    picked = outs[index.clamp(max=E - 1), tok].double()  # [T, k, H]
    w = torch.where(valid, weights.double(), torch.zeros((), dtype=torch.float64, device=weights.device))
    return (picked * w[..., None]).sum(1)


@torch.no_grad()
def enumerate_layer(
    layer: MoELayer, inputs: list[torch.Tensor], keep: int, groups: int = 1
) -> tuple[tuple[int, ...], dict[tuple[int, ...], float]]:
    """(best drop-set, loss of every drop-set) for one layer given its block inputs (one tensor per batch)."""
    drops = list(_candidate_drops(layer, keep, groups))
    losses = dict.fromkeys(drops, 0.0)
    device = layer.router_weight.device
    current: dict[int, tuple[int, ...]] = {}
    with router_logits_forced_to_minus_inf([layer], current):
        for x in inputs:
            x = x.to(device)
            _, w_full, idx_full = layer.router(x)
            outs = torch.stack([layer.adapter.expert_output(layer.experts, e, x) for e in range(layer.num_experts)])
            full = _routed_sum(outs, w_full, idx_full)
            for drop in drops:
                current[layer.index] = drop
                _, w, idx = layer.router(x)
                losses[drop] += float(torch.linalg.norm(full - _routed_sum(outs, w, idx)))
            current.clear()
    best = min(losses, key=losses.get)
    return best, losses


@register_expert_method(
    "naee", needs="data", supports_global=False, options=("max_subsets", "progressive", "max_tokens")
)
def naee(ctx: SelectionContext) -> dict[int, list[int]]:
    """NAEE enumeration (options: max_subsets, progressive, max_tokens)."""
    opts = ctx.options
    check_enumeration(ctx, opts.get("max_subsets"))
    if ctx.calibration is None:
        raise ValueError(
            "NAEE needs calibration data: run it through prune()/select_experts() with calibration token ids"
        )
    progressive = bool(opts.get("progressive", False))
    max_tokens = int(opts.get("max_tokens") or ctx.calibration.numel())
    layers = {layer.index: layer for layer in ctx.layers}
    dropped: dict[int, tuple[int, ...]] = {}

    def on_layer(i, moe, stats) -> bool:
        if moe is None or i not in layers:
            return False
        best, _ = enumerate_layer(moe, stats.block_inputs, ctx.keep_per_layer[i], _groups(moe, ctx.model))
        dropped[i] = best
        stats.block_inputs.clear()
        stats.block_outputs.clear()
        return progressive  # re-run the layer with its drop-set masked, so the next layer sees pruned inputs

    with router_logits_forced_to_minus_inf(ctx.model, dropped if progressive else {}):
        ctx.calibrate(collect=(), on_layer=on_layer, keep_block_io=max_tokens, desc="NAEE enumeration")
    return {i: [e for e in range(layer.num_experts) if e not in dropped[i]] for i, layer in layers.items()}


__all__ = [
    "naee",
    "naee_subsets",
    "check_enumeration",
    "enumerate_layer",
    "EnumerationTooLargeError",
    "DEFAULT_MAX_SUBSETS",
]
