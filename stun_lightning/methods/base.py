"""The structured phase's one interface: a method picks the experts to keep in every MoE layer.

A method is a function ``select(ctx: SelectionContext) -> dict[layer_index, list[kept experts]]``
registered under a name with :func:`register_expert_method`; it declares the ``method_options`` it
reads (others are refused by ``StunRecipe.validate``, so a misspelt option is an error, not a
silent default) and what calibration it needs:
``None`` (no forward pass at all), a statistic the shared pass collects before ``select`` runs
(``"routing"``, ``"saliency"``: ``ctx.stats``), or ``"data"`` (the calibration token ids only: the method
runs its own passes with ``ctx.calibrate(...)``, counted in ``ctx.layer_passes``). Adding a method is
one file and one registration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..adapters import MoELayer
from ..calibration import CalibrationStats, calibrate


@dataclass
class SelectionContext:
    """What a method sees.

    ``keep_per_layer`` holds the count to keep in each layer when the budget is per layer
    (``layer_budget="uniform"``); with ``layer_budget="global"`` it is None and the method must keep
    exactly ``keep_total`` experts over all layers, at least ``min_keep[i]`` in layer i.
    """

    model: nn.Module
    layers: list[MoELayer]
    keep_total: int
    keep_per_layer: dict[int, int] | None
    min_keep: dict[int, int]
    stats: CalibrationStats | None = None
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    calibration: torch.Tensor | None = None  # token ids [N, L]
    batch_size: int = 8
    device: str | torch.device | None = None
    progress: bool = False
    layer_passes: int = 0  # decoder-layer passes the method ran itself

    def calibrate(self, **kwargs) -> CalibrationStats:
        """A streamed pass over the calibration ids (``kwargs`` as :func:`stun_lightning.calibrate`)."""
        if self.calibration is None or self.calibration.numel() == 0:
            raise ValueError(
                "this expert method needs calibration data: pass calibration token ids [N, L] of the task's text"
            )
        kwargs.setdefault("progress", self.progress)
        stats = calibrate(self.model, self.calibration, batch_size=self.batch_size, device=self.device, **kwargs)
        self.layer_passes += stats.layer_passes
        return stats


@dataclass(frozen=True)
class ExpertMethod:
    name: str
    select: Callable[[SelectionContext], dict[int, list[int]]]
    needs: (
        str | None | Callable[[dict[str, Any]], str | None]
    )  # None, "routing", "saliency", "data", or a function of the options
    supports_global: bool
    options: frozenset[str] = frozenset()  # the method_options it reads

    def check_options(self, options: dict[str, Any]) -> None:
        """Refuse ``method_options`` this method does not read, naming the ones it does."""
        unknown = sorted(set(options) - self.options)
        if not unknown:
            return
        import difflib

        hints = [
            f"{k!r} -> {m[0]!r}?" for k in unknown if (m := difflib.get_close_matches(k, sorted(self.options), n=1))
        ]
        known = ", ".join(sorted(self.options)) or "none"
        raise ValueError(
            f"method_options {unknown} are not options of expert method {self.name!r} (it reads: {known})"
            + (f"; did you mean {', '.join(hints)}" if hints else "")
        )

    def needs_for(self, options: dict[str, Any]) -> str | None:
        return self.needs(options) if callable(self.needs) else self.needs


_METHODS: dict[str, ExpertMethod] = {}


def register_expert_method(name: str, needs=None, supports_global: bool = True, options: tuple[str, ...] = ()):
    def wrap(fn):
        _METHODS[name] = ExpertMethod(name, fn, needs, supports_global, frozenset(options))
        return fn

    return wrap


def get_expert_method(name: str) -> ExpertMethod:
    if name not in _METHODS:
        raise ValueError(f"unknown expert-pruning method {name!r}; choose one of {sorted(_METHODS)}")
    return _METHODS[name]


def expert_methods() -> list[str]:
    return sorted(_METHODS)


def keep_top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, sorted (ties broken by the lower index)."""
    order = sorted(range(len(scores)), key=lambda e: (-float(scores[e]), e))
    return sorted(order[:k])


def distribute_global(scores: dict[int, torch.Tensor], ctx: SelectionContext) -> dict[int, list[int]]:
    """Keep the ``keep_total`` highest-scoring experts over all layers, honouring ``min_keep``."""
    keep = {i: set(keep_top(s, ctx.min_keep[i])) for i, s in scores.items()}
    rest = sorted(
        ((float(s[e]), i, e) for i, s in scores.items() for e in range(len(s)) if e not in keep[i]),
        key=lambda t: (-t[0], t[1], t[2]),
    )
    budget = ctx.keep_total - sum(len(v) for v in keep.values())
    for _, i, e in rest[: max(0, budget)]:
        keep[i].add(e)
    return {i: sorted(v) for i, v in keep.items()}


def select_by_scores(scores: dict[int, torch.Tensor], ctx: SelectionContext) -> dict[int, list[int]]:
    if ctx.keep_per_layer is not None:
        return {i: keep_top(s, ctx.keep_per_layer[i]) for i, s in scores.items()}
    return distribute_global(scores, ctx)
