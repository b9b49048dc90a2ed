"""UNCURL: task-specific reduction of the experts per MoE layer, as we read the abstract.

Sarkar et al., "Revisiting SMoE Language Models by Evaluating Inefficiencies with Task Specific
Expert Pruning" (arXiv 2409.01483; ENLSP @ NeurIPS 2024). Only the abstract is public (no code, no
method text): an offline, post-training, task-aware method that reduces the number of experts per
MoE layer using the task's data, with a threshold pruning factor (depending on the number of
experts used in pretraining) beyond which quality degrades. **This implementation is our reading
of that abstract, not the authors' algorithm.**

Our reading, per MoE layer, on the calibration token ids given to ``prune()`` (pass the *task's*
text there):

1. Characterise each expert by its router-logit behaviour on the task: the token-by-token logit
   it receives, centred per token (the router's softmax ignores a shift shared by all experts).
   Expert i and j are similar when their centred logits are correlated (Pearson over the task's
   tokens); distance ``1 - corr``. Streamed as a Gram matrix, so memory does not grow with the data.
2. Cluster the experts to the target count with average-linkage agglomerative clustering.
3. Merge each cluster into its most frequently routed member: expert weights (and biases) and
   router rows (and router biases / score-correction biases) become the average of the members'
   weighted by how many task tokens each received (uniform if none did). Top-k is unchanged.

The pruning factor ``E / E'`` (:func:`pruning_factor`) is logged per layer; report it next to
quality to see the abstract's threshold. Same count in every layer (``layer_budget="uniform"``).
Cost: one routing pass over the task data (a second one through ``prune()``, whose own routing
pass does not collect the logit correlations).
"""

from __future__ import annotations

import logging

import torch

from ..adapters import MoELayer
from .base import SelectionContext, register_expert_method

log = logging.getLogger(__name__)


def pruning_factor(num_experts: int, kept: int) -> float:
    """UNCURL's pruning factor E / E'."""
    return num_experts / kept


class _LogitCorrelation:
    """Streaming Pearson correlation between experts' per-token centred router logits."""

    def __init__(self, num_experts: int):
        self.n = 0
        self.s1 = torch.zeros(num_experts, dtype=torch.float64)
        self.s2 = torch.zeros(num_experts, num_experts, dtype=torch.float64)

    def __call__(self, module, args, output) -> None:
        logits = (output[0] if isinstance(output, tuple) else output).detach().double()
        logits = logits.reshape(-1, logits.shape[-1])
        centred = logits - logits.mean(dim=-1, keepdim=True)
        self.n += centred.shape[0]
        self.s1 += centred.sum(0).cpu()
        self.s2 += (centred.t() @ centred).cpu()

    def correlation(self) -> torch.Tensor:
        mean = self.s1 / self.n
        cov = self.s2 / self.n - torch.outer(mean, mean)
        std = cov.diagonal().clamp_min(0).sqrt().clamp_min(1e-12)
        return (cov / torch.outer(std, std)).clamp(-1.0, 1.0)


def average_linkage(distance: torch.Tensor, clusters: int) -> list[list[int]]:
    """Agglomerative clustering (average linkage) of a symmetric distance table down to ``clusters``.

    Lance-Williams update: d(a+b, c) = (|a| d(a, c) + |b| d(b, c)) / (|a| + |b|); ties merge the
    lowest-index pair first.
    """
    n = distance.shape[0]
    d = distance.double().clone()
    d.fill_diagonal_(float("inf"))
    members = {i: [i] for i in range(n)}
    while len(members) > clusters:
        a, b = divmod(int(torch.argmin(d)), n)
        a, b = min(a, b), max(a, b)
        na, nb = len(members[a]), len(members[b])
        merged = (na * d[a] + nb * d[b]) / (na + nb)
        d[a], d[:, a] = merged, merged
        d[a, a] = float("inf")
        d[b], d[:, b] = float("inf"), float("inf")
        members[a] = sorted(members[a] + members.pop(b))
    return sorted(members.values())


@torch.no_grad()
def merge_cluster(layer: MoELayer, members: list[int], weights: torch.Tensor) -> int:
    """Merge ``members`` into the one with the largest weight (ties: lowest index); return it."""
    w = weights[members].double()
    survivor = members[int(torch.argmax(w))]  # argmax returns the first maximum
    if len(members) == 1:
        return survivor
    w = w / w.sum() if float(w.sum()) > 0 else torch.full_like(w, 1.0 / len(members))
    tensors = [p for _, p in layer.expert_parameters()]
    tensors += [
        t for name in layer.adapter.router_expert_tensors if (t := getattr(layer.router, name, None)) is not None
    ]
    for t in tensors:
        coeff = w.to(device=t.device, dtype=torch.float64).view(-1, *([1] * (t.dim() - 1)))
        t[survivor] = (t[members].double() * coeff).sum(0).to(t.dtype)
    return survivor


@register_expert_method("uncurl", needs="data", supports_global=False)
def uncurl(ctx: SelectionContext) -> dict[int, list[int]]:
    """UNCURL (our reading): cluster experts by router-logit behaviour on task data, merge by frequency."""
    if ctx.keep_per_layer is None:
        raise ValueError("UNCURL keeps the same number of experts in every layer: use layer_budget='uniform'")
    if ctx.calibration is None or ctx.calibration.numel() == 0:
        raise ValueError("UNCURL needs the task's data: pass its token ids as calibration (a non-empty [N, L] tensor)")
    trackers = {layer.index: _LogitCorrelation(layer.num_experts) for layer in ctx.layers}
    handles = [layer.router.register_forward_hook(trackers[layer.index]) for layer in ctx.layers]
    try:
        stats = ctx.calibrate(collect=(), desc="UNCURL router logits")
    finally:
        for h in handles:
            h.remove()
    keep = {}
    for layer in ctx.layers:
        target = ctx.keep_per_layer[layer.index]
        clusters = average_linkage(1.0 - trackers[layer.index].correlation(), target)
        counts = stats[layer.index].expert_tokens
        keep[layer.index] = sorted(merge_cluster(layer, c, counts) for c in clusters)
        log.info(
            "UNCURL layer %d: %d -> %d experts (pruning factor %.2f)",
            layer.index,
            layer.num_experts,
            target,
            pruning_factor(layer.num_experts, target),
        )
    return keep


__all__ = ["uncurl", "pruning_factor", "average_linkage", "merge_cluster"]
