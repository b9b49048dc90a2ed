"""StunDistillModule's optimizer: AdamW over the trainable parameters, the learning rate warmed up
linearly for ``warmup`` steps, then decayed on a cosine to ``floor`` times the peak at the fit's last step."""

from __future__ import annotations

import math
from typing import Iterable

import torch


def warmup_cosine(step: int, total: int, warmup: int, floor: float) -> float:
    """The learning-rate factor at optimizer step ``step`` of ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_warmup_cosine(
    params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, total: int, warmup: int, floor: float
) -> dict:
    """What ``configure_optimizers`` returns: the optimizer and its per-step scheduler."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, total, warmup, floor))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
