"""Which transformers MoE model a LightningModule holds: the attribute a StunCallback prunes (dotted
paths allowed; by default ``student``, then ``model``), and the model inside a peft wrapper."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule
from torch import nn


def base_model(model: nn.Module) -> nn.Module:
    """``model`` itself, or the transformers model a peft wrapper holds."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_owner(pl_module: LightningModule, model_attr: str | None) -> tuple[Any, str]:
    """``(object, attribute name)`` of the model on ``pl_module``: ``model_attr``, else ``student``, then ``model``."""
    candidates = [model_attr] if model_attr else ["student", "model"]
    for path in candidates:
        owner, parts = pl_module, path.split(".")
        for part in parts[:-1]:
            owner = getattr(owner, part, None)
        if owner is not None and isinstance(getattr(owner, parts[-1], None), nn.Module):
            return owner, parts[-1]
    raise ValueError(
        f"StunCallback found no model to prune on {type(pl_module).__name__}: tried attribute(s) {candidates}; "
        "pass StunCallback(model_attr='name of the attribute holding the transformers MoE model')"
    )
