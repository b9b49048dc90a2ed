"""Expert merging (``expert_merge``): fold each removed expert into its nearest survivor before removal.

HC-SMoE (Chen et al., 2024) and REAM (router-weighted expert merging) replace pruning by merging:
a removed expert's weights are averaged into a kept one, weighted by how much the router uses each.
Ours, per MoE layer: each removed expert ``r`` goes to the survivor ``s`` whose router row is most
similar (cosine; the survivor that takes over ``r``'s tokens once ``r``'s logit is gone), and
``W_s += w * (W_r - W_s)`` with ``w = m_r / (m_s + m_r)``, for every expert parameter (weights and
biases); ``m`` is the expert's routed-token count (``frequency``) or its summed router weight
(``router_weighted``) on the calibration tokens, and a survivor's mass grows by what it absorbs, so
several removed experts merged into one survivor give their mass-weighted mean. Router rows are
left as they are (the survivor's row routes the merged tokens). Deviations from the papers: the
nearest survivor is chosen by router rows, not by clustering expert outputs (no extra pass; cost
independent of the expert count), and the merge is one weighted average, not their
neuron-aligned merging.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .adapters import moe_layers

MERGES = ("none", "frequency", "router_weighted")


def nearest_survivors(router_weight: torch.Tensor, keep: list[int]) -> dict[int, int]:
    """``{removed expert: survivor}`` by cosine similarity of router rows (ties: lower index)."""
    rows = torch.nn.functional.normalize(router_weight.detach().double(), dim=1)
    removed = [e for e in range(rows.shape[0]) if e not in set(keep)]
    if not removed:
        return {}
    sim = rows[removed] @ rows[keep].t()
    return {r: keep[int(sim[j].argmax())] for j, r in enumerate(removed)}


def merge_mass(stats, merge: str) -> torch.Tensor:
    """Per-expert mass of one layer's routing statistics: routed tokens or summed router weight."""
    if merge == "frequency":
        return stats.expert_tokens.double()
    if merge == "router_weighted":
        return stats.gate_sum.double()
    raise ValueError(f"expert_merge={merge!r} is not one of {list(MERGES)}")


@torch.no_grad()
def merge_into_survivors(
    model: nn.Module, keep: Mapping[int, list[int]], mass: Mapping[int, torch.Tensor]
) -> dict[int, dict[int, int]]:
    """Merge every expert not in ``keep[i]`` into its nearest survivor, in place (nothing is removed:
    the surgery does that next). Returns ``{layer: {removed: survivor}}``."""
    merged = {}
    for layer in moe_layers(model):
        if layer.index not in keep or layer.index not in mass:
            continue
        kept = sorted(keep[layer.index])
        pairs = nearest_survivors(layer.router_weight, kept)
        m = mass[layer.index].double().clone()
        params = [p for _, p in layer.expert_parameters()]
        for r, s in pairs.items():
            total = m[s] + m[r]
            w = float(m[r] / total) if total > 0 else 0.0
            for p in params:
                p[s] += w * (p[r] - p[s])
            m[s] = total
        merged[layer.index] = pairs
    return merged


__all__ = ["MERGES", "merge_into_survivors", "merge_mass", "nearest_survivors"]
