"""Expert surgery: remove routed experts from one MoE layer and keep the model consistent.

Removing expert ``e`` slices every fused expert tensor (weights and biases) and every per-expert
router tensor (weight, bias, DeepSeek's score-correction bias) along the expert axis, updates the
modules' ``num_experts`` and the config. For routers that renormalise the top-k (Mixtral, Qwen /
OLMoE with ``norm_topk_prob=True``, GPT-OSS) the result equals forcing the removed experts' router
logits to ``-inf``; for routers without renormalisation the softmax denominator loses the removed
experts' mass, and for DeepSeek-V3 groups are re-formed contiguously from the survivors.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from .adapters import MoELayer, decoder_layers, get_adapter, moe_layers

#: config field recording expert counts when they differ between layers (``{layer: count}``)
PER_LAYER_COUNTS_FIELD = "stun_num_experts_per_layer"
#: config field recording lowered top-k per layer, when any layer lowered it
PER_LAYER_TOP_K_FIELD = "stun_top_k_per_layer"


class InfeasiblePruningError(ValueError):
    """A requested expert set cannot be realised (fewer experts than top-k, uneven groups...)."""


def check_expert_counts(model: nn.Module, counts: Mapping[int, int], lower_top_k: bool = False) -> None:
    """Refuse, before any work, expert counts that the model cannot run with.

    ``counts`` maps decoder-layer index to the number of experts to keep.
    """
    config = model.config
    adapter = get_adapter(model)
    layers = {layer.index: layer for layer in moe_layers(model)}
    problems = []
    for index, kept in counts.items():
        if index not in layers:
            problems.append(f"layer {index} has no MoE block (MoE layers: {sorted(layers)})")
            continue
        layer = layers[index]
        if not 1 <= kept <= layer.num_experts:
            problems.append(f"layer {index}: cannot keep {kept} of {layer.num_experts} experts")
        elif kept < layer.top_k and not lower_top_k:
            problems.append(
                f"layer {index}: keeping {kept} experts is fewer than top-k={layer.top_k}; keep at "
                f"least {layer.top_k} (lower the expert sparsity) or pass lower_top_k=True"
            )
        if adapter.group_field and getattr(config, adapter.group_field, None):
            n_group = getattr(config, adapter.group_field)
            if kept % n_group:
                problems.append(
                    f"layer {index}: {kept} experts do not split into {adapter.group_field}={n_group} "
                    f"equal groups; choose a count divisible by {n_group}"
                )
    if problems:
        raise InfeasiblePruningError("infeasible expert pruning:\n  " + "\n  ".join(problems))


def _slice_param(module: nn.Module, name: str, keep: torch.Tensor) -> None:
    old = getattr(module, name)
    new = old.detach().index_select(0, keep.to(old.device))  # a new tensor already
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        module.register_buffer(name, new, persistent=name in module.state_dict())


@torch.no_grad()
def remove_experts(model: nn.Module, layer_index: int, remove: Iterable[int], lower_top_k: bool = False) -> list[int]:
    """Remove experts ``remove`` from decoder layer ``layer_index``; return the kept original indices.

    Kept experts keep their order. Raises InfeasiblePruningError if fewer than top-k would remain
    (unless ``lower_top_k``, which sets that layer's top-k to the experts left).
    """
    layer = _layer(model, layer_index)
    remove = sorted(set(int(e) for e in remove))
    keep = [e for e in range(layer.num_experts) if e not in remove]
    return keep_experts(model, layer_index, keep, lower_top_k=lower_top_k)


@torch.no_grad()
def keep_experts(model: nn.Module, layer_index: int, keep: Sequence[int], lower_top_k: bool = False) -> list[int]:
    """Keep only experts ``keep`` (original indices, any order) in one layer; return them sorted."""
    layer = _layer(model, layer_index)
    keep = sorted(set(int(e) for e in keep))
    if keep and (keep[0] < 0 or keep[-1] >= layer.num_experts):
        raise IndexError(f"layer {layer_index} has experts 0..{layer.num_experts - 1}, asked to keep {keep}")
    check_expert_counts(model, {layer_index: len(keep)}, lower_top_k=lower_top_k)
    if len(keep) == layer.num_experts:
        return keep
    index = torch.tensor(keep, dtype=torch.long)
    experts, router = layer.experts, layer.router
    for name, _ in list(experts.named_parameters(recurse=False)):
        _slice_param(experts, name, index)
    for name in layer.adapter.router_expert_tensors:
        if getattr(router, name, None) is not None:
            _slice_param(router, name, index)
    for module in (experts, router):
        if hasattr(module, "num_experts"):
            module.num_experts = len(keep)
    if len(keep) < layer.top_k:
        for module in (router, layer.block):
            if hasattr(module, "top_k"):
                module.top_k = len(keep)
    sync_config(model)
    return keep


def set_expert_counts_shape(model: nn.Module, counts: Mapping[int, int]) -> None:
    """Shrink layers to ``counts`` experts (first experts kept): used to rebuild a saved model's
    shapes before its weights are loaded, so values do not matter."""
    for index, count in counts.items():
        layer = _layer(model, index)
        if count != layer.num_experts:
            keep_experts(model, index, range(count), lower_top_k=True)


def sync_config(model: nn.Module) -> None:
    """Write the current expert counts (and any lowered top-k) into ``model.config``.

    Uniform counts go into the family's own field, so plain ``from_pretrained`` loads the model;
    counts that differ between layers are recorded per layer and need :func:`stun_lightning.load_pruned`.
    """
    config, adapter = model.config, get_adapter(model)
    layers = moe_layers(model)
    counts = {layer.index: layer.num_experts for layer in layers}
    top_ks = {layer.index: layer.top_k for layer in layers}
    if len(set(counts.values())) == 1:
        setattr(config, adapter.count_field, next(iter(counts.values())))
        _drop(config, PER_LAYER_COUNTS_FIELD)
    else:
        setattr(config, adapter.count_field, max(counts.values()))
        setattr(config, PER_LAYER_COUNTS_FIELD, {str(i): n for i, n in counts.items()})
    if any(k != config.num_experts_per_tok for k in top_ks.values()):
        setattr(config, PER_LAYER_TOP_K_FIELD, {str(i): k for i, k in top_ks.items()})
    else:
        _drop(config, PER_LAYER_TOP_K_FIELD)
    if hasattr(model, "num_experts"):  # the *ForCausalLM's copy, used by the auxiliary loss
        model.num_experts = getattr(config, adapter.count_field)


def recorded_expert_counts(config) -> dict[int, int] | None:
    """Per-layer counts recorded in a saved config, or None when counts are uniform."""
    counts = getattr(config, PER_LAYER_COUNTS_FIELD, None)
    return {int(k): int(v) for k, v in counts.items()} if counts else None


def recorded_top_k(config) -> dict[int, int] | None:
    top_k = getattr(config, PER_LAYER_TOP_K_FIELD, None)
    return {int(k): int(v) for k, v in top_k.items()} if top_k else None


def apply_top_k(model: nn.Module, top_k: Mapping[int, int]) -> None:
    for index, k in top_k.items():
        layer = _layer(model, index)
        for module in (layer.router, layer.block):
            if hasattr(module, "top_k"):
                module.top_k = k


def _layer(model: nn.Module, index: int) -> MoELayer:
    for layer in moe_layers(model):
        if layer.index == index:
            return layer
    n = len(decoder_layers(model))
    raise IndexError(f"decoder layer {index} of {n} has no MoE block")


def _drop(config, name: str) -> None:
    if hasattr(config, name):
        try:
            delattr(config, name)
        except AttributeError:
            setattr(config, name, None)
