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
linears' weights) and shares the rest. Its score is the next-token NLL of that pruned copy on
held-out calibration blocks (the last ``recipe.split_held_out`` of them, at least one), which
neither the selection nor the masks see. Fractions are taken from 0 up, a larger one replacing the best so far only when its per-block gain beats ``recipe.split_margin`` paired standard errors (ours; 0: the least loss). Fractions are
tried from 0 up and the search stops once the loss rose for two candidates in a row (a loss that
rose twice is taken to keep rising). With ``recipe.split_groups > 1`` (default 4) the uniform
choice is then refined non-uniformly, group of consecutive layers by group, each move kept only
when its held-out gain beats ``recipe.split_margin`` paired standard errors
(:mod:`stun_lightning.split.refine`). At most ``len(REMOVAL_FRACTIONS) + 2 * split_groups``
candidates are scored, whatever the expert count. The chosen candidate's experts, merge mass and
boolean keep-masks are carried out (:class:`Candidate`), and ``prune()`` applies them: the pruned
model is exactly the scored one (its masks calibrated on the non-held-out blocks). Memory: one trial
copy of the expert weights plus the boolean masks of at most three candidates. Shown on two
from-scratch reference models (``benchmarks/results/quality_auto_h100.md``): the block-output error
below ranks splits unlike the model's perplexity.

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

import torch
from torch import nn

from ..recipe import StunRecipe
from .block_error import block_output, choose_split_by_block_error, error_curves, layer_error_curve
from .budgets import allocate_removals, choose_budgets, interpolate
from .candidate import Candidate, Scored, block_losses, score_candidate, trial_copy
from .model_loss import choose_split_by_loss, held_out_blocks, removes_more_for_less, rose_twice
from .plan import (
    GROUP_MIN_EXPERTS,
    MAX_TOKENS,
    REMOVAL_FRACTIONS,
    SplitPlan,
    _removals_within_target,  # noqa: F401 (the old private name, imported by stun_lightning.stream)
    candidate_removals,
    group_counts,
    layer_count,
    removal_at,
    removals_per_layer,
    removals_within_target,
    select_at_counts,
    survivor_sparsity,
    uniform_candidates,
    survivor_sparsities,
)
from .refine import beats_margin, layer_groups, moved, paired_gain, refine_counts


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


#: ``recipe.split_criterion`` -> how ``choose_split`` ranks the candidates (names: ``recipe.SPLIT_CRITERIA``)
CRITERIA = {"model_loss": choose_split_by_loss, "block_error": choose_split_by_block_error}


__all__ = [
    "Candidate",
    "Scored",
    "beats_margin",
    "block_losses",
    "layer_groups",
    "moved",
    "paired_gain",
    "refine_counts",
    "score_candidate",
    "CRITERIA",
    "GROUP_MIN_EXPERTS",
    "MAX_TOKENS",
    "REMOVAL_FRACTIONS",
    "SplitPlan",
    "allocate_removals",
    "block_output",
    "candidate_removals",
    "choose_budgets",
    "choose_split",
    "choose_split_by_block_error",
    "choose_split_by_loss",
    "error_curves",
    "group_counts",
    "held_out_blocks",
    "interpolate",
    "layer_count",
    "layer_error_curve",
    "removal_at",
    "removals_per_layer",
    "removals_within_target",
    "removes_more_for_less",
    "rose_twice",
    "select_at_counts",
    "survivor_sparsity",
    "trial_copy",
    "uniform_candidates",
    "survivor_sparsities",
]
