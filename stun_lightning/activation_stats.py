"""Wanda / MoE-Pruner statistics gathered from the forward passes a training loop already makes.

The calibration engine (``stun_lightning.calibration``) streams a fixed calibration set through the
model layer by layer. During training there is no separate pass: :class:`ActivationStats` puts the
same per-MoE-layer hooks (the engine's collector: routed tokens, per-expert input-channel sums of
squares, plain and gate-weighted, read from the model's own routing) on the live model, so every
training forward between :meth:`ActivationStats.open` and :meth:`ActivationStats.close` adds to the
statistics, except while :attr:`ActivationStats.paused` is set (the callback sets it during validation). Statistics of one window describe
the weights as they were during that window, the analogue of Wanda's one-shot calibration.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import moe_layers
from .collectors import MoECollector
from .layer_stats import NORMS, ROUTING, LayerStats


class _PausableCollector(MoECollector):
    """The engine's collector, ignoring forward passes while its owner is paused."""

    def __init__(self, owner: "ActivationStats", *args):
        self.owner = owner
        super().__init__(*args)

    def _on_experts(self, module, args):
        if not self.owner.paused:
            super()._on_experts(module, args)

    def _on_router(self, module, args, output):
        if not self.owner.paused:
            super()._on_router(module, args, output)


class ActivationStats:
    """Hooks on every MoE layer of ``model`` that accumulate :class:`LayerStats` while open.

    Usage::

        stats = ActivationStats(model, norms=True)
        stats.open()
        ...  # training forward passes
        per_layer = stats.close()  # {decoder layer index: LayerStats}, tensors on CPU
    """

    def __init__(self, model: nn.Module, norms: bool = True):
        self.model = model
        self.collect = {ROUTING, NORMS} if norms else {ROUTING}
        self._collectors: list[MoECollector] = []
        self._pending: dict[int, dict] = {}
        self.paused = False  # set while forward passes must not count (validation)

    @property
    def is_open(self) -> bool:
        return bool(self._collectors)

    def open(self) -> None:
        if self._collectors:
            return
        self._collectors = [_PausableCollector(self, layer, self.collect, 0) for layer in moe_layers(self.model)]
        for c in self._collectors:
            saved = self._pending.pop(c.layer.index, None)
            if saved is not None:
                c.stats.add_state(saved)
        self._pending = {}

    def close(self) -> dict[int, LayerStats]:
        out = {c.layer.index: c.close() for c in self._collectors}
        self._collectors = []
        return out

    def tokens_seen(self) -> int:
        return sum(c.stats.tokens for c in self._collectors)

    def state_dict(self) -> dict[int, dict]:
        """The statistics gathered so far in the open window (CPU copies), for checkpoints."""
        return {c.layer.index: c.stats.summed_state() for c in self._collectors}

    def load_state_dict(self, state: dict[int, dict]) -> None:
        """Statistics of a window interrupted by a checkpoint: added to the next :meth:`open`."""
        self._pending = {int(k): v for k, v in state.items()}


def reduce_stats(stats: dict[int, LayerStats], reduce_sum) -> dict[int, LayerStats]:
    """Sum every accumulated tensor of ``stats`` with ``reduce_sum(tensor) -> tensor`` (e.g. an
    all-reduce across data-parallel ranks), so every rank computes the same masks."""
    for s in stats.values():
        s.tokens = int(reduce_sum(torch.tensor(float(s.tokens), dtype=torch.float64)).item())
        s.map_summed(lambda t: reduce_sum(t.double()).to(t.dtype))
    return stats


__all__ = ["ActivationStats", "LayerStats", "reduce_stats"]
