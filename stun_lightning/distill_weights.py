"""How the distillation terms add up (``stun_lightning.distill``): their weights, MoE-Pruner's initial
lambda ``L_CE / L_term``, the recovery options and the term each distils with, and the weighted total."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class DistillWeights:
    """Weights of the loss terms.

    ``expert``: None initialises lambda to ``L_CE / L_expert`` at the first step (MoE-Pruner), a
    number fixes it. ``logit_kl`` / ``block`` / ``router``: weights of the optional terms (0 = off).
    """

    ce: float = 1.0
    expert: float | None = None
    logit_kl: float = 0.0
    block: float = 0.0
    temperature: float = 2.0
    router: float = 0.0

    def __post_init__(self) -> None:
        for name in ("ce", "logit_kl", "block", "router"):
            if getattr(self, name) < 0:
                raise ValueError(f"distillation weight {name} must be >= 0, got {getattr(self, name)}")
        if self.expert is not None and self.expert < 0:
            raise ValueError(f"distillation weight expert must be >= 0 or None (auto), got {self.expert}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def init_expert_lambda(ce: torch.Tensor, expert: torch.Tensor) -> float | None:
    """MoE-Pruner's initial lambda, ``L_CE / L_expert``, so both terms start equal.

    Returns None while the expert term is exactly zero (the surviving experts still reproduce the
    teacher's on their inputs, e.g. before any weight is masked): the term then contributes neither
    loss nor gradient, and lambda is initialised at the first step where it is not zero.
    """
    ce_v, ex_v = float(ce.detach()), float(expert.detach())
    if not math.isfinite(ce_v) or not math.isfinite(ex_v) or ex_v < 0:
        raise ValueError(
            f"cannot initialise lambda = L_CE / L_expert with L_CE={ce_v}, L_expert={ex_v}; "
            "set the expert weight explicitly (DistillWeights(expert=...))"
        )
    return ce_v / ex_v if ex_v > 0 else None


@dataclass
class DistillLosses:
    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


RECOVERY_LOSSES = {
    "ce": None,
    "logit_kd": "logit_kl",
    "expert_kd": "expert",
    "block_kd": "block",
    "router_kd": "router",
}
"""Recovery options: the name of each and the loss term it adds to the cross-entropy (its lambda)."""


def check_recovery_loss(loss: str) -> str | None:
    """The term that ``loss`` distils with (None for ``"ce"``), or a ValueError naming the options."""
    if loss not in RECOVERY_LOSSES:
        raise ValueError(f"unknown recovery loss {loss!r}; choose one of {', '.join(RECOVERY_LOSSES)}")
    return RECOVERY_LOSSES[loss]


def combine(
    weights: DistillWeights,
    expert_lambda: float | None,
    ce: torch.Tensor,
    expert=None,
    kl=None,
    block=None,
    router=None,
    primary: str = "expert",
) -> DistillLosses:
    """``ce_w * CE + lambda * L_primary + sum w * L_other`` with every term reported.

    ``primary`` names the term weighted by ``expert_lambda`` (0 while it is None): ``"expert"``
    (MoE-Pruner) or the term of another recovery option (:data:`RECOVERY_LOSSES`); the others use
    their weights in ``weights``.
    """
    terms = {"ce": ce}
    total = weights.ce * ce
    fixed = {"expert": 0.0, "logit_kl": weights.logit_kl, "block": weights.block, "router": weights.router}
    for name, value in (("expert", expert), ("logit_kl", kl), ("block", block), ("router", router)):
        if value is None:
            continue
        terms[name] = value
        weight = (expert_lambda if expert_lambda is not None else 0.0) if name == primary else fixed[name]
        total = total + weight * value
    return DistillLosses(total, terms)
