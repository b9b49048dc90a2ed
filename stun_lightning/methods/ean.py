"""EAN: expert activation norm, an output-aware expert-pruning criterion.

The baseline of REAP's repository (Lasby et al., arXiv 2510.13999; CerebrasResearch/reap @1970473):
the score of expert j in a layer is the sum over the calibration tokens routed to j of
``||f_j(x)||_2`` (f = the expert's unweighted output), not gate-weighted and not averaged (REAP is
the gate-weighted mean). The lowest-scoring experts are removed, the same count in every layer.
The routed set is the model's own (as for REAP here), so biased and group-limited routers are
scored as they route. Cost: the same single streamed ``"saliency"`` pass as REAP.
"""

from __future__ import annotations

import torch

from ..calibration import SALIENCY
from .base import SelectionContext, register_expert_method, select_by_scores


def ean_scores(ctx: SelectionContext) -> dict[int, torch.Tensor]:
    """EAN score ``[E]`` (fp64) of every MoE layer in ``ctx``."""
    stats = ctx.stats
    if stats is None or any(stats[layer.index].output_norm_sum is None for layer in ctx.layers):
        stats = ctx.calibrate(collect=(SALIENCY,), desc="EAN activation norms")
    return {layer.index: stats[layer.index].output_norm_sum.clone() for layer in ctx.layers}


@register_expert_method("ean", needs=SALIENCY, supports_global=False)
def ean(ctx: SelectionContext) -> dict[int, list[int]]:
    """Keep the experts with the largest summed output norm over their routed tokens."""
    return select_by_scores(ean_scores(ctx), ctx)


__all__ = ["ean", "ean_scores"]
