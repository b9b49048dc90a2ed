"""``expert_sparsity: "auto"``: how many experts each layer loses, chosen for a total target.

For a target ``T`` (``recipe.total_sparsity``) over expert parameters, a layer that keeps ``kept``
of its ``orig`` experts and masks the survivors at ``s`` has expert sparsity ``1 - (1 - s) * kept /
orig``; it meets ``T`` with ``s = 1 - (1 - T) * orig / kept``. Candidate removals are ``r`` experts
for ``r`` in :data:`REMOVAL_FRACTIONS` of ``orig`` (rounded; at least top-k kept, and for
expert-group routers (DeepSeek-V3) multiples of ``n_group`` with every group keeping what its
routing needs), the experts to remove chosen by ``recipe.expert_method`` at that count.
``recipe.split_criterion`` ranks them:

``model_loss`` (default, :func:`choose_split_by_loss`): one removal fraction for every layer (each
layer its largest feasible count not above it). Each candidate is pruned as ``prune()`` would prune
it (the recipe's expert selection, surgery and unstructured phase, OWL allocation included) on a
trial copy of the model that owns its expert and router tensors (and with ``prune_dense`` its dense
linears' weights) and shares the rest: at most one extra copy of the expert weights at a time. Its
score is the next-token NLL of that pruned copy on held-out calibration blocks (the last
``recipe.split_held_out`` of them, at least one), which neither the selection nor the masks see.
The least loss wins (ties: fewer removals). Fractions are tried from 0 up and the search stops
once the loss rose for two candidates in a row (a loss that rose twice is taken to keep rising), so
at most ``len(REMOVAL_FRACTIONS)`` candidates, whatever the expert count. The real prune then
removes the chosen experts and its unstructured phase calibrates on every block, held-out ones
included, so its masks can differ slightly from the candidate's. Shown on two from-scratch
reference models (``benchmarks/results/quality_auto_h100.md``): the block-output error below ranks
splits unlike the model's perplexity.

``block_error`` (:func:`choose_split_by_block_error`): per MoE layer, each candidate's survivors
masked with the recipe's metric at that layer's ``s``, the relative squared error of the MoE block
output against the dense block on the calibration tokens, ``sum ||Z - Z'||^2 / sum ||Z||^2``, with
the removed experts' router logits forced to ``-inf`` (exactly removal for softmax routers with or
without renormalisation and GPT-OSS; for DeepSeek-V3 groups an approximation, as surgery re-forms
the groups). Each layer then keeps the removal count of least error (ties: fewer removals). Cost:
one selection per candidate count, one streamed calibration pass, and one block forward per
candidate and calibration batch (at most :data:`MAX_TOKENS` tokens per layer); inputs are the dense
model's (not sequential).

Either way every layer meets ``T`` and so does the total, exactly up to mask rounding; the
unstructured phase gives each layer that ``s`` (``allocation_base="layer"``, which ``auto`` implies).

``layer_budget="error_curve"`` (:func:`choose_budgets`) uses the block-error curves for a fixed
``expert_sparsity``: survivors masked at the recipe's within-expert sparsity, the total removal
count spread over layers (multiples of ``n_group``) to minimise the summed error, linear between
measured counts, by an exact dynamic programme (:func:`allocate_removals`); STUN's ``global``
threshold instead compares router distances across layers and can pile removals into one layer.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .adapters import MoELayer, decoder_layers, get_adapter, moe_layers
from .calibration import calibrate
from .evaluate import block_nll
from .metrics import get_metric
from .recipe import StunRecipe
from .report import ModelCensus
from .routing import router_logits_forced_to_minus_inf
from .structured import ExpertSelection, apply_expert_sets, run_selection
from .unstructured import dense_linears, expert_layer_masks, mask_survivors

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
    if calibration is None:
        raise ValueError("error curves measure block outputs on calibration data: pass calibration token ids [N, L]")
    layers = moe_layers(model)
    # removals chosen by the recipe's method, one selection per candidate fraction (counts per layer)
    unmerged = dataclasses.replace(recipe, expert_merge="none")
    candidates = {layer.index: {0: list(range(layer.num_experts))} for layer in layers}
    passes = 0
    for f in REMOVAL_FRACTIONS[1:]:
        per_layer = {layer.index: layer.num_experts - _removal_at(f, removals[layer.index]) for layer in layers}
        todo = {i: k for i, k in per_layer.items() if layer_count(layers, i) - k not in candidates[i]}
        if not todo:
            continue
        selection = select_at_counts(
            model, unmerged, calibration, per_layer, min_keep, device=device, progress=progress
        )
        passes += selection.layer_passes
        for i, k in todo.items():
            candidates[i][layer_count(layers, i) - k] = selection.keep[i]

    errors: dict[int, dict[int, float]] = {}
    evaluations = 0

    def on_layer(i, moe, stats) -> bool:
        nonlocal evaluations
        if moe is None:
            return False
        errors[i] = layer_error_curve(
            moe, stats.block_inputs, stats.block_outputs, candidates[i], sparsity_of, recipe, stats
        )
        evaluations += len(candidates[i]) * len(stats.block_inputs)
        stats.block_inputs.clear()
        stats.block_outputs.clear()
        return False

    stats = calibrate(
        model,
        calibration,
        collect=get_metric(recipe.metric).collect(),
        batch_size=recipe.batch_size,
        device=device,
        on_layer=on_layer,
        keep_block_io=min(MAX_TOKENS, calibration.numel()),
        progress=progress,
        desc="expert error curves",
    )
    return candidates, errors, passes + stats.layer_passes, evaluations


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


def _removals(model: nn.Module, min_keep: dict[int, int]) -> dict[int, dict[float, int]]:
    n_group, topk_group = group_counts(model)
    return {
        layer.index: candidate_removals(layer.num_experts, min_keep[layer.index], n_group, topk_group, layer.top_k)
        for layer in moe_layers(model)
    }


def _removals_within_target(model: nn.Module, target: float, min_keep: dict[int, int]) -> dict[int, dict[float, int]]:
    # a removal that alone exceeds the target is not a candidate
    layers = moe_layers(model)
    return {
        i: {
            f: r
            for f, r in found.items()
            if survivor_sparsity(target, layer_count(layers, i), layer_count(layers, i) - r) >= 0
        }
        for i, found in _removals(model, min_keep).items()
    }


def _within(target: float, layers: list[MoELayer], keep: dict[int, list[int]]) -> dict[int, float]:
    return {i: max(0.0, survivor_sparsity(target, layer_count(layers, i), len(keep[i]))) for i in keep}


def choose_split(
    model: nn.Module,
    recipe: StunRecipe,
    calibration: torch.Tensor,
    *,
    min_keep: dict[int, int],
    device: str | torch.device | None = None,
    progress: bool = False,
) -> SplitPlan:
    """Expert removals per layer for ``recipe.total_sparsity`` by ``recipe.split_criterion`` (see the
    module docstring). Nothing is removed from ``model``."""
    return CRITERIA[recipe.split_criterion](
        model, recipe, calibration, min_keep=min_keep, device=device, progress=progress
    )


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


def uniform_candidates(layers: list[MoELayer], removals: dict[int, dict[float, int]]) -> dict[float, dict[int, int]]:
    """``{fraction: experts removed per layer}``: each layer's largest feasible removal not above the
    fraction, one entry per distinct set of counts (the smallest fraction that gives it)."""
    out: dict[float, dict[int, int]] = {}
    for f in REMOVAL_FRACTIONS:
        counts = {layer.index: _removal_at(f, removals[layer.index]) for layer in layers}
        if counts not in out.values():
            out[f] = counts
    return out


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
    candidates = uniform_candidates(layers, _removals_within_target(model, target, min_keep))
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
        _within(target, layers, keeps[best]),
        layer_passes=passes,
        criterion="model_loss",
        losses=losses,
        tried=tried,
        held_out_blocks=held_out.shape[0],
    )


def choose_split_by_block_error(
    model: nn.Module,
    recipe: StunRecipe,
    calibration: torch.Tensor,
    *,
    min_keep: dict[int, int],
    device: str | torch.device | None = None,
    progress: bool = False,
) -> SplitPlan:
    """``split_criterion="block_error"``: each layer's removal count of least relative block-output error."""
    target = float(recipe.total_sparsity)
    layers = moe_layers(model)
    removals = _removals_within_target(model, target, min_keep)
    sparsity_of = lambda orig, kept: survivor_sparsity(target, orig, kept)  # noqa: E731
    candidates, errors, passes, evaluations = error_curves(
        model, recipe, calibration, removals, min_keep, sparsity_of, device=device, progress=progress
    )
    removed = {i: min(curve, key=lambda r: (curve[r], r)) for i, curve in errors.items()}
    keep = {i: candidates[i][r] for i, r in removed.items()}
    return SplitPlan(target, keep, removed, _within(target, layers, keep), errors, passes, evaluations, candidates)


#: ``recipe.split_criterion`` -> how ``choose_split`` ranks the candidates (names: ``recipe.SPLIT_CRITERIA``)
CRITERIA = {"model_loss": choose_split_by_loss, "block_error": choose_split_by_block_error}


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
        model,
        recipe,
        calibration,
        _removals(model, min_keep),
        min_keep,
        lambda orig, kept: within,
        device=device,
        progress=progress,
    )
    removed = allocate_removals(errors, total, group_counts(model)[0])
    record = {
        "budget": "error_curve",
        "removed": removed,
        "errors": {i: {r: round(e, 6) for r, e in c.items()} for i, c in errors.items()},
        "block_evaluations": evaluations,
    }
    return {layer.index: layer.num_experts - removed[layer.index] for layer in layers}, record, passes


def layer_count(layers: list[MoELayer], index: int) -> int:
    return next(layer.num_experts for layer in layers if layer.index == index)


__all__ = [
    "CRITERIA",
    "MAX_TOKENS",
    "REMOVAL_FRACTIONS",
    "SplitPlan",
    "allocate_removals",
    "block_output",
    "candidate_loss",
    "candidate_removals",
    "choose_budgets",
    "choose_split",
    "choose_split_by_block_error",
    "choose_split_by_loss",
    "error_curves",
    "held_out_blocks",
    "layer_error_curve",
    "select_at_counts",
    "survivor_sparsity",
    "trial_copy",
    "uniform_candidates",
]
