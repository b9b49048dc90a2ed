"""Tiny real transformers MoE models, for defaults, examples and tests.

Why real families instead of a toy MoE: the pruning core reaches routers,
fused expert tensors and shared experts through per-family adapters, so tests
must run on the exact module classes transformers builds for Mixtral, Qwen-MoE,
OLMoE, DeepSeek-V3 and GPT-OSS, only shrunk to a size that builds in
milliseconds and runs on a CPU.

Defaults shared by all families: hidden 64, 4 heads of 16, 8 routed experts,
top-2 routing, expert intermediate 32 (a multiple of 8, so 2:4 and 4:8 masks
tile it), vocab = the shipped tokenizer, 1024 positions, float32, eager attention; every bias
(attention, expert and router biases, DeepSeek-V3's ``e_score_correction_bias``) gets seeded
non-zero random values, so slicing and gating are tested on real values.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DeepseekV3Config,
    GptOssConfig,
    MixtralConfig,
    OlmoeConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tokenizer"

SUPPORTED_TINY_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")

_CONFIG_CLASSES = {
    "mixtral": MixtralConfig,
    "qwen2_moe": Qwen2MoeConfig,
    "qwen3_moe": Qwen3MoeConfig,
    "olmoe": OlmoeConfig,
    "deepseek_v3": DeepseekV3Config,
    "gpt_oss": GptOssConfig,
}

_COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention, as in the real models
    max_position_embeddings=1024,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
    use_cache=True,
    # The tokenizer's pad is its eos; giving the model a pad id would make
    # nn.Embedding zero and freeze the eos row (padding_idx), so the model has none.
    pad_token_id=None,
)

# Per family: only the fields whose names differ between families, or that the
# family needs set to stay tiny. The expert count is spelled differently per
# config class (num_local_experts / num_experts / n_routed_experts), and the
# expert width is `intermediate_size` for Mixtral/OLMoE/GPT-OSS but
# `moe_intermediate_size` for Qwen-MoE/DeepSeek (where `intermediate_size` is a dense MLP).
_FAMILY = {
    "mixtral": dict(num_local_experts=8, intermediate_size=32, router_jitter_noise=0.0),
    "qwen2_moe": dict(
        num_experts=8,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        intermediate_size=64,  # only used by layers listed in mlp_only_layers
        norm_topk_prob=False,  # as Qwen1.5-MoE
    ),
    "qwen3_moe": dict(num_experts=8, moe_intermediate_size=32, intermediate_size=64, norm_topk_prob=True),
    "olmoe": dict(num_experts=8, intermediate_size=32, norm_topk_prob=False),
    "deepseek_v3": dict(
        num_hidden_layers=3,  # layer 0 dense, layers 1-2 MoE
        first_k_dense_replace=1,
        n_routed_experts=8,
        n_shared_experts=1,
        moe_intermediate_size=32,
        intermediate_size=64,  # the dense layer's MLP
        n_group=2,
        topk_group=1,
        # Multi-head latent attention, shrunk; MLA has no grouped-query heads.
        num_key_value_heads=4,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=16,
        num_mtp_layers=0,  # no multi-token-prediction head: a plain decoder
    ),
    "gpt_oss": dict(
        num_local_experts=8,
        intermediate_size=32,
        head_dim=16,
        sliding_window=128,  # layer_types default: even layers sliding, odd layers full
        # YaRN as in the real model, scaled to the tiny context: 128 * 8 = 1024.
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 8.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 128,
        },
    ),
}


# Scales of the random biases given to tiny models (transformers initialises most biases to zero,
# which would let surgery that slices a bias wrongly, or gating that ignores one, pass unnoticed).
_BIAS_STD = 0.02  # linear and expert biases: the weights' own init scale
_SCORE_CORRECTION_STD = (
    0.02  # DeepSeek-V3: a routing bias of about the spread of its sigmoid scores: routing turns uneven
)


@torch.no_grad()
def _nonzero_biases(model: PreTrainedModel) -> None:
    """Give every bias of ``model`` (parameters and buffers, incl. DeepSeek-V3's
    ``e_score_correction_bias``) seeded random values; non-zero biases are kept as initialised."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in tensors:
        if not name.rsplit(".", 1)[-1].endswith("bias") or not t.is_floating_point() or bool(t.any()):
            continue
        std = _SCORE_CORRECTION_STD if name.endswith("e_score_correction_bias") else _BIAS_STD
        t.copy_(torch.randn(t.shape, dtype=t.dtype) * std)


@lru_cache(maxsize=8)
def _cached_tokenizer(path: str | None):
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR) if path is None else path)


def load_tokenizer(path: str | Path | None = None):
    """The shipped byte-level BPE tokenizer (``path=None``) or any ``from_pretrained`` path.

    Cached per path, since parsing tokenizer.json takes longer than building a tiny
    model; the object is therefore shared: ``copy.deepcopy`` it before changing
    settings such as ``padding_side``.
    """
    if path is None and not (TOKENIZER_DIR / "tokenizer.json").exists():
        raise FileNotFoundError(
            f"shipped tokenizer missing at {TOKENIZER_DIR}; rebuild it with `python -m benchmarks.build_assets --data DIR`"
        )
    return _cached_tokenizer(None if path is None else str(path))


def tiny_config(family: str, **overrides: Any) -> PretrainedConfig:
    """A tiny config of a real transformers MoE family; ``overrides`` win over defaults.

    Overrides use the family's own field names (e.g. ``num_local_experts`` for
    Mixtral, ``num_experts`` for Qwen/OLMoE, ``n_routed_experts`` for DeepSeek-V3).
    """
    if family not in _CONFIG_CLASSES:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {SUPPORTED_TINY_FAMILIES}")
    tokenizer = load_tokenizer()
    fields = dict(
        _COMMON,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation="eager",  # every family (incl. GPT-OSS sinks, MLA) supports it on CPU
    )
    fields.update(_FAMILY[family])
    fields.update(overrides)
    return _CONFIG_CLASSES[family](**fields)


def build_tiny_model(family: str = "mixtral", seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A randomly initialised tiny MoE causal LM, identical for identical (family, seed, overrides).

    The caller's global RNG state is left untouched (init runs in a forked RNG).
    """
    config = tiny_config(family, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _nonzero_biases(model)
    # generate() needs a pad id for batched/finished sequences; the model config has none (see _COMMON).
    model.generation_config.pad_token_id = config.eos_token_id
    return model.eval()
