"""Model specs of the command line and configs: ``"reference"``, ``"tiny:<family>"`` or a ``from_pretrained`` path."""

from __future__ import annotations

import torch
from torch import nn

#: dtype names of the configs
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, None: None}


def load_causal_lm(spec: str | nn.Module, dtype: str | None = None, seed: int = 0) -> nn.Module:
    """A model from ``"reference"`` (the shipped trained MoE), ``"tiny:<family>"`` (the shipped random
    tiny models), a ``from_pretrained`` path, or as given."""
    if isinstance(spec, nn.Module):
        return spec
    if spec == "reference":
        from stun_lightning.reference import load_reference_model

        return load_reference_model(DTYPES[dtype] or torch.float32)[0]
    if spec.startswith("tiny:"):
        from stun_lightning.tiny import build_tiny_model

        model = build_tiny_model(spec.split(":", 1)[1], seed=seed)
        return model.to(DTYPES[dtype]) if dtype else model
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(spec, dtype=DTYPES[dtype] if dtype else "auto")


def tokenizer_for(spec: str) -> str | None:
    """The tokenizer path that goes with a model spec (None = the shipped tokenizer of tiny and reference models)."""
    return None if spec == "reference" or spec.startswith("tiny:") else spec
