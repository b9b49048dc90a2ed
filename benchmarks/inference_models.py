"""The models of ``benchmarks/inference.py``: the masked dense model and its pruned variants, their
decode and prefill steps, and what the floor of a row counts (stored bytes, the routers' choices).
"""

from __future__ import annotations

import copy

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from stun_lightning import keep_experts, moe_layers
from stun_lightning.adapters import decoder_layers
from stun_lightning.patterns import mask_from_scores
from stun_lightning.metrics import weighted_magnitude
from stun_lightning.sparse import sparsify
from stun_lightning.sparse.convert import expert_modules


def build_model(shape: dict, layers: int, vocab: int, device: str, seed: int) -> torch.nn.Module:
    """Random bf16 causal LM with every expert matrix masked 2:4 by magnitude, ``grouped_mm`` experts."""
    model_type, fields = shape
    config = AutoConfig.for_model(
        model_type, vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=4096, **fields
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").to(device)
    model.set_experts_implementation("grouped_mm")
    with torch.no_grad():
        for layer in moe_layers(model):
            for w in layer.expert_matrices().values():
                for e in range(w.shape[0]):  # one expert at a time: scores are float32
                    w[e].mul_(mask_from_scores(weighted_magnitude(w[e]), 0.5, "2:4"))
    return model.eval()


def build_variants(dense: torch.nn.Module, names, seed: int) -> dict:
    models = {"dense": dense}
    if {"experts-25%", "both"} & set(names):
        pruned = copy.deepcopy(dense)
        generator = torch.Generator().manual_seed(seed)
        for layer in moe_layers(pruned):
            n = layer.num_experts
            keep_experts(pruned, layer.index, torch.randperm(n, generator=generator)[: n - n // 4].tolist())
        models["experts-25%"] = pruned
    if "2:4" in names:
        models["2:4"] = sparsify(copy.deepcopy(dense))
    if "both" in names:
        models["both"] = sparsify(copy.deepcopy(models["experts-25%"]))
    return models  # with the dense bases of the variants asked for: their float32 references


def float_reference(model: torch.nn.Module) -> torch.nn.Module:
    ref = copy.deepcopy(model).float()
    ref.set_experts_implementation("eager")  # grouped_mm has no float32 CUDA kernel
    return ref


def nbytes(*modules) -> int:
    """Bytes of the tensors the modules store (parameters and buffers; shared ones once)."""
    seen = {}
    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def moe_blocks(model) -> list[tuple]:
    """(block, router, experts) of every MoE layer (``expert_modules`` never decompresses 2:4 experts)."""
    layers = decoder_layers(model)
    return [(layers[i].mlp, getattr(layers[i].mlp, a.router_attr), experts) for i, experts, a in expert_modules(model)]


def decode_step(model, cache, position: int):
    """One decode step on a static cache, rewinding the cache's write position first (so that it can repeat)."""

    def step(ids, positions):
        for layer in cache.layers:
            if layer.is_initialized:
                layer.cumulative_length.fill_(position)
        return model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True).logits

    return step


def prefill_step(model):
    def step(ids, positions):
        return model(input_ids=ids, position_ids=positions, use_cache=False).logits

    return step


class RoutingRecorder:
    """Records every MoE router's (top-k weights, top-k indices) during one forward, or, given
    ``force``, makes the routers return those instead (a float32 reference routed as the bf16 run was,
    so that bf16 router ties are not counted as error)."""

    def __init__(self, model, force=None):
        self.model, self.routing, self.force = model, [], force

    def _hook(self, i):
        def hook(module, inputs, out):
            if self.force is None:
                self.routing.append(out[1:])
                return None
            weights, index = self.force[i]
            return out[0], weights.to(out[1].dtype), index

        return hook

    def __enter__(self):
        self.handles = [
            router.register_forward_hook(self._hook(i)) for i, (_, router, _) in enumerate(moe_blocks(self.model))
        ]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def nbytes_of_cache(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
