"""What ``auto`` chooses from: candidate removal counts per layer, the survivor sparsity that meets
a total, and the :class:`SplitPlan` record of the choice."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters import MoELayer, get_adapter, moe_layers
from ..recipe import StunRecipe
from ..structured import ExpertSelection, run_selection


#: fractions of a layer's experts tried as removals
REMOVAL_FRACTIONS = (0.0, 0.125, 0.25, 0.375, 0.5)
#: calibration tokens per layer whose block outputs the error curves compare
MAX_TOKENS = 8192
#: experts a DeepSeek-V3 group needs at the least (its group score sums its top-2 experts)
GROUP_MIN_EXPERTS = 2


@dataclass
class SplitPlan:
    """What ``auto`` chose: experts kept per layer and the scores it chose from."""

    target: float
    keep: dict[int, list[int]]
    removed: dict[int, int]  # experts removed per layer
    within: dict[int, float]  # sparsity inside the survivors per layer
    errors: dict[int, dict[int, float]] = field(
        default_factory=dict
    )  # block_error: layer -> {experts removed: relative block-output error}
    layer_passes: int = 0
    block_evaluations: int = 0
    candidates: dict[int, dict[int, list[int]]] = field(
        default_factory=dict, repr=False
    )  # block_error: layer -> {r: kept}
    criterion: str = "block_error"
    losses: dict[float, float] = field(default_factory=dict)  # model_loss: removal fraction -> held-out NLL
    tried: dict[float, dict[int, int]] = field(
        default_factory=dict
    )  # model_loss: removal fraction -> experts removed per layer
    held_out_blocks: int = 0
    uniform: float | None = None  # model_loss: the removal fraction chosen before refinement
    moves: list[dict] = field(default_factory=list)  # model_loss: group moves tried (split_groups > 1)
    candidate: object | None = field(
        default=None, repr=False
    )  # model_loss: the chosen pruned candidate (split.candidate.Candidate), applied by prune()

    def to_dict(self) -> dict:
        """The record in the prune report (``expert_split``)."""
        record = {
            "target": self.target,
            "criterion": self.criterion,
            "removed": dict(self.removed),
            "within": {i: round(s, 6) for i, s in self.within.items()},
        }
        if self.criterion == "model_loss":
            record.update(
                losses={f: round(v, 6) for f, v in self.losses.items()},
                candidates={f: dict(r) for f, r in self.tried.items()},
                held_out_blocks=self.held_out_blocks,
                uniform=self.uniform,
                moves=[dict(m, removed=dict(m["removed"])) for m in self.moves],
            )
        else:
            record.update(
                errors={i: {r: round(e, 6) for r, e in c.items()} for i, c in self.errors.items()},
                block_evaluations=self.block_evaluations,
            )
        return record


def survivor_sparsity(target: float, orig: int, kept: int) -> float:
    """Sparsity inside ``kept`` of ``orig`` equal experts that makes the layer's expert sparsity ``target``."""
    return 1.0 - (1.0 - target) * orig / kept


def group_counts(model: nn.Module) -> tuple[int, int]:
    """(n_group, topk_group) of an expert-group router, (1, 1) for every other family."""
    adapter = get_adapter(model)
    n_group = int(getattr(model.config, adapter.group_field, None) or 1) if adapter.group_field else 1
    topk_group = int(getattr(model.config, adapter.topk_group_field, None) or 1) if adapter.topk_group_field else 1
    return n_group, topk_group


def candidate_removals(
    num_experts: int, min_keep: int, n_group: int = 1, topk_group: int = 1, top_k: int = 1
) -> dict[float, int]:
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


def removal_at(fraction: float, removals: dict[float, int]) -> int:
    """The largest feasible removal of ``removals`` (``{fraction: r}``) not above ``fraction``'s."""
    return max(r for f, r in removals.items() if f <= fraction)


def select_at_counts(
    model: nn.Module,
    recipe: StunRecipe,
    calibration: torch.Tensor,
    per_layer: dict[int, int],
    min_keep: dict[int, int],
    *,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> ExpertSelection:
    """The recipe's expert selection (and merge mass) keeping ``per_layer[i]`` experts in layer ``i``."""
    fixed = dataclasses.replace(
        recipe, expert_sparsity=0.25, layer_budget="uniform"
    )  # a fraction: the counts are given
    return run_selection(
        model, fixed, calibration, plan=(sum(per_layer.values()), per_layer, min_keep), device=device, progress=progress
    )


def removals_per_layer(model: nn.Module, min_keep: dict[int, int]) -> dict[int, dict[float, int]]:
    """``{layer: {fraction: experts removed}}``: :func:`candidate_removals` of every MoE layer."""
    n_group, topk_group = group_counts(model)
    return {
        layer.index: candidate_removals(layer.num_experts, min_keep[layer.index], n_group, topk_group, layer.top_k)
        for layer in moe_layers(model)
    }


def removals_within_target(model: nn.Module, target: float, min_keep: dict[int, int]) -> dict[int, dict[float, int]]:
    """:func:`removals_per_layer` less the removals that alone exceed ``target``."""
    layers = moe_layers(model)
    return {
        i: {
            f: r
            for f, r in found.items()
            if survivor_sparsity(target, layer_count(layers, i), layer_count(layers, i) - r) >= 0
        }
        for i, found in removals_per_layer(model, min_keep).items()
    }


def survivor_sparsities(target: float, layers: list[MoELayer], keep: dict[int, list[int]]) -> dict[int, float]:
    """Sparsity inside the survivors of each layer that keeps ``keep[i]`` and meets ``target``."""
    return {i: max(0.0, survivor_sparsity(target, layer_count(layers, i), len(keep[i]))) for i in keep}


def uniform_candidates(layers: list[MoELayer], removals: dict[int, dict[float, int]]) -> dict[float, dict[int, int]]:
    """``{fraction: experts removed per layer}``: each layer's largest feasible removal not above the
    fraction, one entry per distinct set of counts (the smallest fraction that gives it)."""
    out: dict[float, dict[int, int]] = {}
    for f in REMOVAL_FRACTIONS:
        counts = {layer.index: removal_at(f, removals[layer.index]) for layer in layers}
        if counts not in out.values():
            out[f] = counts
    return out


def layer_count(layers: list[MoELayer], index: int) -> int:
    """The expert count of the MoE layer with decoder index ``index``."""
    return next(layer.num_experts for layer in layers if layer.index == index)


_removals_within_target = removals_within_target  # the old private name (stun_lightning.stream)
