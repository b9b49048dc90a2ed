"""The models ``benchmarks/prune_cost.py`` prunes: the real models' layer shapes with random weights,
the expert-count sweep's dims, and their calibration ids."""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM

from benchmarks.cost_measurement import release_memory
from stun_lightning.adapters import decoder_layers
from stun_lightning.tiny import tiny_config

# Layer shapes: (family, config fields). Head counts and head_dim are the real models', so one
# decoder layer's bytes are the real layer's; vocab and depth are cut so a layer fits anywhere.
SHAPES = {
    "tiny": (
        "mixtral",
        dict(
            hidden_size=64,
            intermediate_size=32,
            num_local_experts=8,
            num_experts_per_tok=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        ),
    ),
    "mixtral": (  # Mixtral-8x7B
        "mixtral",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_local_experts=8,
            num_experts_per_tok=2,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
        ),
    ),
    "qwen3": (  # Qwen3-30B-A3B
        "qwen3_moe",
        dict(
            hidden_size=2048,
            moe_intermediate_size=768,
            intermediate_size=6144,
            num_experts=128,
            num_experts_per_tok=8,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
        ),
    ),
}

# Expert-count sweep: Qwen3-30B-like layers (tiny ones with --quick), top-k capped so that even
# 8 experts at 50% expert sparsity keep at least top-k.
SWEEP_DIMS = {
    "qwen3": {k: v for k, v in SHAPES["qwen3"][1].items() if k not in ("num_experts", "num_experts_per_tok")},
    "tiny": dict(
        hidden_size=64,
        moe_intermediate_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ),
}


def build_model(
    family: str, fields: dict, layers: int, seq_len: int, dtype: torch.dtype, device: torch.device, vocab: int = 1024
):
    """A randomly initialised model on the CPU.

    Initialised on ``device`` and then moved to the CPU: random init of a Mixtral-sized layer takes
    seconds on a GPU and minutes on a few CPU cores.
    """
    config = tiny_config(
        family,
        **fields,
        num_hidden_layers=layers,
        vocab_size=vocab,
        bos_token_id=1,
        eos_token_id=2,
        max_position_embeddings=max(1024, seq_len),
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to("cpu").eval()  # stays on the CPU: prune/calibrate move one layer at a time
    release_memory(device)
    return model


def layer_bytes(model) -> int:
    layer = decoder_layers(model)[0]
    return sum(p.numel() * p.element_size() for p in layer.parameters())


def calibration_ids(vocab: int, samples: int, seq_len: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (samples, seq_len), generator=gen)


def naee_subsets(experts: int, expert_sparsity: float) -> str:
    keep = experts - int(round(experts * expert_sparsity))
    return f"{float(math.comb(experts, keep)):.1e}"


def sweep_model(args, experts: int, device: torch.device, dtype: torch.dtype):
    """``(model, top-k, calibration ids)`` of the expert-count sweep at ``experts`` experts per layer:
    ``args.sweep_dims`` layers, top-k a quarter of the experts, capped at 8."""
    k = min(8, max(1, experts // 4))
    fields = dict(SWEEP_DIMS[args.sweep_dims], num_experts=experts, num_experts_per_tok=k)
    model = build_model("qwen3_moe", fields, args.layers, args.seq_len, dtype, device)
    return model, k, calibration_ids(model.config.vocab_size, args.samples, args.seq_len)
