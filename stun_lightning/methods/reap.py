"""REAP: router-weighted expert activation pruning.

Lasby et al., "REAP: One-Shot Pruning for Trillion-Parameter Mixture-of-Experts Models"
(arXiv 2510.13999; CerebrasResearch/reap @1970473). Saliency of expert j in a layer:

    S_j = mean over the calibration tokens routed to j of  g_j(x) * ||f_j(x)||_2

(g = the gate value the token gives j, f_j = the expert's unweighted output). The experts with the
lowest saliency are removed, the same count in every layer; router rows (and biases /
score-correction biases) are sliced by the core's surgery; top-k is unchanged. An expert no
calibration token reaches has saliency 0 and goes first.

Deviation [open in the sources]: the official code takes g from a softmax over all router logits
(renormalised over the top-k only when the config says so) and re-derives the routed set with
``topk`` on the logits; we read the routed set and gate the model's own router hands its experts,
so biased (GPT-OSS), sigmoid and group-limited (DeepSeek-V3, including ``routed_scaling_factor``)
routers are scored as they really route.

Cost: one streamed calibration pass collecting ``"saliency"`` (each routed token's expert output is
recomputed once in the statistics hook). When the caller's calibration pass did not collect it
(``prune()`` asks for routing statistics only), REAP runs that pass itself over the same token ids.
Calibrate on the target domain: the paper finds C4 calibration collapses code accuracy.
"""

from __future__ import annotations

import torch

from ..calibration import SALIENCY
from .base import SelectionContext, register_expert_method, select_by_scores


def reap_saliency(ctx: SelectionContext) -> dict[int, torch.Tensor]:
    """REAP saliency ``[E]`` (fp64) of every MoE layer in ``ctx``."""
    stats = ctx.stats
    if stats is None or any(stats[layer.index].saliency_sum is None for layer in ctx.layers):
        stats = ctx.calibrate(collect=(SALIENCY,), desc="REAP saliency")
    return {layer.index: stats[layer.index].saliency() for layer in ctx.layers}


@register_expert_method("reap", needs=SALIENCY, supports_global=False)
def reap(ctx: SelectionContext) -> dict[int, list[int]]:
    """Keep the experts with the highest REAP saliency, the same count in every layer."""
    return select_by_scores(reap_saliency(ctx), ctx)


__all__ = ["reap", "reap_saliency"]
