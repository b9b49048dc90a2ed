"""One ``model_loss`` candidate: pruned on a trial copy as ``prune()`` prunes, scored per held-out
block, and kept (experts, merge mass, keep-masks) so that ``prune()`` applies exactly what was scored."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import decoder_layers, moe_layers
from ..recipe import StunRecipe
from ..report import ModelCensus
from ..structured import ExpertSelection, apply_expert_sets
from ..unstructured import dense_linears, mask_survivors


@dataclass
class Candidate:
    """A pruned candidate as ``prune()`` reproduces it on the dense model: the experts kept and the
    merge mass (:class:`ExpertSelection`), then a boolean keep-mask per pruned matrix: ``(MoE layer
    index, expert matrix name)`` and, with ``prune_dense``, ``(decoder layer index, linear name)``.
    The masks are the trial's nonzeros after its unstructured phase, so multiplying the dense model's
    surviving weights by them gives the trial's weights exactly. ``layer_targets`` and
    ``low_token_experts`` are what that unstructured phase reported."""

    keep: dict[int, list[int]]
    merge_mass: dict[int, torch.Tensor] | None = None
    expert_masks: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict, repr=False)
    dense_masks: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict, repr=False)
    layer_targets: dict[int, float] = field(default_factory=dict)
    low_token_experts: dict[int, list[int]] = field(default_factory=dict)

    @torch.no_grad()
    def apply_masks(self, model: nn.Module) -> None:
        """Mask ``model`` (its experts already removed as ``keep`` says) with the candidate's masks."""
        for layer in moe_layers(model):
            for name, w in layer.expert_matrices().items():
                mask = self.expert_masks.get((layer.index, name))
                if mask is not None:
                    w.mul_(mask.to(device=w.device, dtype=w.dtype))
        for i, decoder_layer in enumerate(decoder_layers(model)):
            for name, linear in dense_linears(decoder_layer):
                mask = self.dense_masks.get((i, name))
                if mask is not None:
                    linear.weight.mul_(mask.to(device=linear.weight.device, dtype=linear.weight.dtype))


@dataclass
class Scored:
    """A candidate's next-token NLL per held-out block, its mean over tokens (as
    :func:`stun_lightning.evaluate.block_nll`), the decoder-layer passes spent, and the candidate."""

    block_losses: torch.Tensor  # [held-out blocks], float64
    loss: float
    passes: int
    candidate: Candidate | None = field(default=None, repr=False)


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


@torch.no_grad()
def block_losses(
    model: nn.Module, blocks: torch.Tensor, batch_size: int = 4, device: str | torch.device | None = None
) -> tuple[torch.Tensor, float]:
    """(next-token NLL summed per block ``[N]`` float64, mean NLL per predicted token) of ``model`` on
    token blocks ``[N, L]``, each block scored on its own; the mean is ``block_nll``'s."""
    device = torch.device(device) if device is not None else model.get_input_embeddings().weight.device
    was_training = model.training
    model.eval()
    sums, count = [], 0
    try:
        for batch in blocks.split(batch_size):
            ids = batch.to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
            nll = F.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")
            sums.append(nll.double().sum(dim=1).cpu())
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    per_block = torch.cat(sums)
    return per_block, float(per_block.sum()) / count


def score_candidate(
    model: nn.Module,
    recipe: StunRecipe,
    selection: ExpertSelection,
    statistics: torch.Tensor,
    held_out: torch.Tensor,
    *,
    device: str | torch.device | None = None,
    keep: bool = True,
) -> Scored:
    """``model`` pruned as ``prune()`` prunes it with the experts of ``selection`` (unstructured phase
    calibrated on ``statistics``), scored on ``held_out``, on a :func:`trial_copy`; ``model`` is
    left as it is. The masks calibrate layer by layer on ``device``; the held-out forward runs the
    whole copy where its embedding lives. ``keep``: also return the :class:`Candidate` (boolean
    masks: one byte per pruned weight)."""
    before = ModelCensus.of(model)
    trial = trial_copy(model, recipe.prune_dense)
    apply_expert_sets(trial, selection.keep, lower_top_k=recipe.lower_top_k, merge_mass=selection.merge_mass)
    passes, targets, low_tokens = 0, {}, {}
    if recipe.prunes_weights:
        targets, low_tokens, passes = mask_survivors(trial, recipe, before, statistics, device=device, progress=False)
    per_block, loss = block_losses(trial, held_out, recipe.batch_size, device)
    candidate = None
    if keep:
        candidate = Candidate(selection.keep, selection.merge_mass, layer_targets=targets, low_token_experts=low_tokens)
        if recipe.prunes_weights:
            for layer in moe_layers(trial):
                for name, w in layer.expert_matrices().items():
                    candidate.expert_masks[layer.index, name] = w != 0
            if recipe.prune_dense:
                for i, decoder_layer in enumerate(decoder_layers(trial)):
                    for name, linear in dense_linears(decoder_layer):
                        candidate.dense_masks[i, name] = linear.weight != 0
    n_tokens = held_out.shape[1] - 1
    return Scored(per_block / n_tokens, loss, passes + len(decoder_layers(trial)), candidate)
