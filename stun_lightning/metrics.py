"""Weight-importance metrics of the unstructured phase: name -> score function + the statistics it needs.

Every metric scores an ``[out, in]`` weight matrix as ``|W_ij| * c_j``, with ``c_j`` a per-input-channel
factor read from calibration statistics (``None``: plain magnitude). Scores are compared within each
output row, as Wanda does (``stun_lightning.patterns.mask_from_scores``).

* ``magnitude``: ``|W_ij|``; needs no data.
* ``wanda`` (Sun et al. 2023): ``|W_ij| * ||X_j||_2`` over the tokens routed to the expert.
* ``moe_pruner`` (Xie et al. 2024): ``|W_ij| * ||X_j * g||_2``, each token's input scaled by its gate
  value for the expert. Deviations: the paper does not say whether ``down_proj``'s input is gated
  too; we gate every expert matrix (as the third-party reimplementation does). ``g`` is the routing
  weight the model's own router hands its experts (``top_k_weights``): with ``norm_topk_prob=False``
  that is the un-renormalised softmax value, and DeepSeek's ``routed_scaling_factor`` is included.
  On dense linears (``prune_dense``) there is no gate: Wanda is used.

Adding a metric is one :class:`WeightMetric` in :data:`METRICS` (plus its test).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .calibration import LINEAR, NORMS, LayerStats


@dataclass(frozen=True)
class WeightMetric:
    """One importance metric.

    name: the recipe's ``metric`` value.
    statistics: what ``calibrate(collect=...)`` / ``ActivationStats`` must collect for it (empty: none).
    expert_channels: ``(stats, matrix) -> [E, in]`` input-channel factors of one expert matrix, or None.
    dense_channels: ``(stats, linear name) -> [in]`` factors of a dense ``nn.Linear`` (``prune_dense``), or None.
    """

    name: str
    statistics: tuple[str, ...] = ()
    expert_channels: Callable[[LayerStats, str], torch.Tensor] | None = None
    dense_channels: Callable[[LayerStats, str], torch.Tensor] | None = None

    @property
    def needs_data(self) -> bool:
        return bool(self.statistics)

    def collect(self, prune_dense: bool = False) -> tuple[str, ...]:
        """The statistics ``calibrate`` must collect (``LINEAR`` too when dense linears are pruned)."""
        return (*self.statistics, LINEAR) if prune_dense and self.dense_channels is not None else self.statistics


def weighted_magnitude(weight: torch.Tensor, channels: torch.Tensor | None = None) -> torch.Tensor:
    """``|W_ij| * channels_j`` (fp32) of ``weight`` ``[out, in]``; ``channels=None``: ``|W_ij|``."""
    w = weight.detach().float().abs()
    return w if channels is None else w * channels.float().to(w.device)[None, :]


def _linear_norms(stats: LayerStats, name: str) -> torch.Tensor:
    return stats.linear_sq[name].clamp_min(0).sqrt()


METRICS: dict[str, WeightMetric] = {
    m.name: m
    for m in (
        WeightMetric("magnitude"),
        WeightMetric("wanda", (NORMS,), lambda s, matrix: s.input_norms(matrix), _linear_norms),
        WeightMetric("moe_pruner", (NORMS,), lambda s, matrix: s.input_norms(matrix, gated=True), _linear_norms),
    )
}


def get_metric(name: str) -> WeightMetric:
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; choose one of {list(METRICS)}") from None


__all__ = ["METRICS", "WeightMetric", "get_metric", "weighted_magnitude"]
