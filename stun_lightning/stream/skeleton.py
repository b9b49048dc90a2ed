"""The model skeleton: decoder layers on the meta device, everything else (routers included) loaded."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..adapters import decoder_layers, get_adapter, moe_layers
from .shards import CorruptShardError, ShardReader, _Only, read_layer


def _layer_prefix(model: nn.Module, i: int) -> str:
    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers[i]:
            return name + "."
    raise RuntimeError(f"decoder layer {i} not found")


def _router_tensors(layer: nn.Module, model: nn.Module, i: int) -> dict[str, torch.Tensor]:
    """Names (local to the decoder layer) of the router tensors kept resident."""
    moe = {m.index: m for m in moe_layers(model)}.get(i)
    if moe is None:
        return {}
    prefix = next(n for n, m in layer.named_modules() if m is moe.router)
    return {f"{prefix}.{k}": v for k, v in moe.router.state_dict().items()}


def build_skeleton(directory: Path, reader: ShardReader, torch_dtype: torch.dtype | None = None) -> nn.Module:
    """The model with every decoder-layer tensor on the meta device except the routers; the rest loaded."""
    from transformers import AutoConfig, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from ..serialization import _with_per_layer_counts
    from ..surgery import apply_top_k, recorded_expert_counts, recorded_top_k

    config = AutoConfig.from_pretrained(directory)
    model_cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    counts = recorded_expert_counts(config)
    if counts is not None:
        model_cls = _with_per_layer_counts(model_cls, counts)
    get_adapter(config)  # a clear error for a family without an adapter, before any reading
    dtype = torch_dtype or getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = model_cls(config)
    if counts is not None:
        model.__class__ = model_cls.__bases__[0]
    model.to(dtype)
    model.config.dtype = dtype
    # non-persistent buffers (rotary frequencies) are computed at construction, not stored: rebuild them
    for name, module in list(model.named_modules()):
        if any(b.is_meta for n, b in module.named_buffers(recurse=False) if n in module._non_persistent_buffers_set):
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], type(module)(config=model.config))
    layer_names = [_layer_prefix(model, i) for i in range(len(decoder_layers(model)))]
    state = {}
    for key in model.state_dict():
        if not any(key.startswith(p) for p in layer_names) and key in reader.files:
            state[key] = reader.get(key).to(dtype)
    for i, layer in enumerate(decoder_layers(model)):
        for local in _router_tensors(layer, model, i):
            tensors, _ = read_layer(_Only(reader, layer_names[i] + local, layer_names[i]), layer_names[i])
            state[layer_names[i] + local] = next(iter(tensors.values())).to(dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [k for k, v in model.state_dict().items() if v.is_meta and not any(k.startswith(p) for p in layer_names)]
    if missing:
        raise CorruptShardError(f"checkpoint {directory} has no tensors for {missing[:4]}")
    try:
        model.generation_config = GenerationConfig.from_pretrained(directory)
    except OSError:
        pass
    top_k = recorded_top_k(model.config)
    if top_k:
        apply_top_k(model, top_k)
    return model.eval()
