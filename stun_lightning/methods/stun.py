"""STUN's structured phase: cluster similar experts per layer, keep one representative each.

Lee et al., "STUN: Structured-Then-Unstructured Pruning for Scalable MoE Pruning" (ACL 2025),
following the official code (thnkinbtfly/STUN, ``merge_weight.py`` @21b0153):

* Distance between experts i, j of a layer (``distance=``):
  ``"router"`` (default): ``||W_i - W_j||_2`` of the router rows in fp32, divided by ``||W||_F``
  (``divide_by_norm``); no forward pass at all.
  ``"coactivation"``: ``-A_ij / |mean A|``, A = calibration tokens routed to both i and j (one
  routing pass on the original model, whatever the expert count).
  ``"mixed"``: ``mix_weight * (-A_ij / |mean A|) + ||W_i - W_j||_2``.
* Greedy clustering with a threshold t, as the official loop: repeatedly take the smallest
  remaining distance (v1, v2); merge their clusters if every member of v1's cluster is within t of
  v2 and every member of v2's cluster within t of v1 (read from the running distance table, where
  merged or rejected pairs are set to infinity); otherwise reject that pair for good. Stop when no
  distance below t remains or the layer reached its minimum count.
* ``layer_budget="global"`` (official): one threshold for all layers, found by the official
  doubling-then-halving search so that the total number of clusters equals the target exactly.
  ``layer_budget="uniform"`` (ours, so plain transformers can load the result): a threshold per layer
  hitting the per-layer count.
* Survivor: the member closest in L2 to its cluster's mean (expert weights flattened and joined);
  its router row is kept, the others dropped; router logits are not combined. Where a layer ends
  with at most ``merge_max_clusters`` clusters (official default 0), members' weights and router
  rows are averaged into the survivor instead, as the official code does.

Deviations: (1) the official code stops with an error when the threshold search stalls on a count
it cannot hit exactly; we then take the closest larger count and merge the globally closest
remaining pair of clusters (the pair whose farthest members are closest) until the count is exact.
(2) Each layer keeps at least max(top-k, ``min_keep``) experts (the official per-layer cap is a
``top_k`` argument counting removals; ``max_removed_per_layer`` gives the same cap).
(3) With top-k > 2 co-activation counts pairs inside the top-k (top-2: exactly STUN's count).
(4) Threshold search: the official loop starts at the user's ``--threshold`` with a step of 0.1 in
distance units, and exits with an error once 10 trials in a row give the same count. We start at 0
for router distances (``-max |d|`` for co-activation and mixed ones, which can be negative) with a
step of ``0.1 * max |d|`` (the largest finite ``|d|`` of any MoE layer), so no threshold
is asked of the user and the step scales with the distances; the doubling-then-halving rule is the
official one, and the search stops after 200 trials or when the step falls under 1e-12 (then (1)).

:func:`expert_weight_cosine` measures the premise that makes merging by router distance safe:
experts that started as copies of one FFN (upcycled MoEs) keep a high mean weight cosine, experts
of an MoE trained from scratch are close to orthogonal (``python -m benchmarks.quality`` prints it
per model).
"""

from __future__ import annotations

import torch

from ..calibration import enter_layer, leave_layer
from .base import SelectionContext, register_expert_method

DISTANCES = ("router", "coactivation", "mixed")


def expert_distances(
    router_weight: torch.Tensor,
    coactivation: torch.Tensor | None = None,
    distance: str = "router",
    divide_by_norm: bool = True,
    mix_weight: float = 1.0,
) -> torch.Tensor:
    """STUN's pairwise distance table of one layer (diagonal = inf)."""
    w = router_weight.detach().float().cpu()
    if distance not in DISTANCES:
        raise ValueError(f"unknown STUN distance {distance!r}; choose one of {DISTANCES}")
    if distance == "router":
        d = torch.cdist(w, w)
        if divide_by_norm:
            d = d / torch.linalg.norm(w)
    else:
        if coactivation is None:
            raise ValueError(f"STUN distance {distance!r} needs co-activation counts from a calibration pass")
        a = coactivation.double().clone()
        a.fill_diagonal_(0)
        d = (-a / a.mean().abs().clamp_min(1e-12)).float()
        if distance == "mixed":
            d = d * mix_weight + torch.cdist(w, w)
    d = d.clone()
    d.fill_diagonal_(float("inf"))
    return d


def greedy_clusters(distances: torch.Tensor, threshold: float, min_clusters: int) -> list[list[int]]:
    """The official greedy threshold clustering of one layer."""
    values = distances.clone()
    n = values.shape[0]
    member = {i: frozenset([i]) for i in range(n)}
    clusters = n
    while clusters > min_clusters:
        flat = int(torch.argmin(values))
        v1, v2 = divmod(flat, n)
        if not float(values[v1, v2]) < threshold:
            break
        c1, c2 = member[v1], member[v2]
        m1, m2 = list(c1), list(c2)
        if float(torch.cat([values[m1, v2], values[m2, v1]]).max()) < threshold:
            values[m1, v2] = float("inf")
            values[m2, v1] = float("inf")
            union = c1 | c2
            for v in union:
                member[v] = union
            clusters -= 1
        else:
            values[v1, v2] = float("inf")
            values[v2, v1] = float("inf")
    return sorted({tuple(sorted(c)) for c in member.values()})


def _search_threshold(count_at, target: int, start: float = 0.0, step: float = 0.1, max_iter: int = 200):
    """Official doubling-then-halving threshold search; returns (threshold, count) pairs tried."""
    t, last_dir, doubling, tried = start, 0, True, []
    for _ in range(max_iter):
        n = count_at(t)
        tried.append((t, n))
        if n == target:
            break
        direction = 1 if n > target else -1
        if last_dir * direction < 0:
            doubling = False
        step = step * 2 if doubling else step / 2
        t += step * direction
        last_dir = direction
        if step < 1e-12:
            break
    return tried


def _force_count(
    dist: dict[int, torch.Tensor], clusters: dict[int, list[list[int]]], target: int, min_keep: dict[int, int]
) -> None:
    """Merge the closest clusters (anywhere in ``dist``'s layers) until ``target`` clusters remain."""
    while sum(len(c) for c in clusters.values()) > target:
        best = None
        for i, cl in clusters.items():
            if len(cl) <= min_keep[i]:
                continue
            for a in range(len(cl)):
                for b in range(a + 1, len(cl)):
                    d = float(dist[i][list(cl[a])][:, list(cl[b])].max())
                    if best is None or d < best[0]:
                        best = (d, i, a, b)
        if best is None:
            raise RuntimeError("STUN cannot reach the expert target under the per-layer minimum")
        _, i, a, b = best
        cl = clusters[i]
        merged = tuple(sorted(cl[a] + cl[b]))
        clusters[i] = sorted([c for k, c in enumerate(cl) if k not in (a, b)] + [merged])


def _representative(layer, cluster: tuple[int, ...]) -> int:
    if len(cluster) == 1:
        return cluster[0]
    idx = torch.tensor(cluster)
    sq = torch.zeros(len(cluster), dtype=torch.float64)
    for _, p in layer.expert_parameters():  # one parameter at a time: no flattened copy of the experts
        members = p.detach()[idx.to(p.device)].float()
        sq += (members - members.mean(0)).flatten(1).square().sum(1).double().cpu()
    return cluster[int(torch.argmin(sq))]


@torch.no_grad()
def _average_into(layer, cluster: tuple[int, ...], survivor: int) -> None:
    idx = list(cluster)
    for _, p in layer.expert_parameters():
        p[survivor] = p[idx].mean(0)
    for name in layer.adapter.router_expert_tensors:
        t = getattr(layer.router, name, None)
        if t is not None:
            t[survivor] = t[idx].mean(0)


@register_expert_method(
    "stun",
    needs=lambda options: None if options.get("distance", "router") == "router" else "routing",
    options=("distance", "divide_by_norm", "mix_weight", "merge_max_clusters"),
)
def stun(ctx: SelectionContext) -> dict[int, list[int]]:
    """STUN expert pruning (options: distance, divide_by_norm, mix_weight, merge_max_clusters)."""
    opts = ctx.options
    distance = opts.get("distance", "router")
    if distance != "router" and ctx.stats is None:
        raise ValueError(f"STUN distance {distance!r} needs a routing calibration pass")
    dist = {
        layer.index: expert_distances(
            layer.router_weight,
            ctx.stats[layer.index].coactivation if ctx.stats is not None else None,
            distance,
            opts.get("divide_by_norm", True),
            opts.get("mix_weight", 1.0),
        )
        for layer in ctx.layers
    }
    finite = [float(d[torch.isfinite(d)].abs().max()) for d in dist.values() if torch.isfinite(d).any()]
    scale = max(finite, default=1.0)

    def cluster_all(t: float, keys) -> dict[int, list[list[int]]]:
        return {i: greedy_clusters(dist[i], t, ctx.min_keep[i]) for i in keys}

    def solve(keys, target: int) -> dict[int, list[list[int]]]:
        cache = {}

        def count_at(t):
            cache[t] = cluster_all(t, keys)
            return sum(len(c) for c in cache[t].values())

        # distances may be negative (co-activation); start below every finite distance
        start = -scale if distance != "router" else 0.0
        tried = _search_threshold(count_at, target, start=start, step=0.1 * scale if scale > 0 else 0.1)
        exact = [t for t, n in tried if n == target]
        if exact:
            return cache[exact[0]]
        above = [(n, t) for t, n in tried if n > target]
        t = min(above)[1] if above else start
        clusters = {i: list(cs) for i, cs in (cache.get(t) or cluster_all(t, keys)).items()}
        _force_count(dist, clusters, target, ctx.min_keep)
        return clusters

    if ctx.keep_per_layer is None:
        clusters = solve(list(dist), ctx.keep_total)
    else:
        clusters = {}
        for i in dist:
            clusters.update(solve([i], ctx.keep_per_layer[i]))

    keep = {}
    merge_max = int(opts.get("merge_max_clusters", 0))
    for layer in ctx.layers:
        cl = clusters[layer.index]
        survivors = []
        reads_weights = any(len(c) > 1 for c in cl)
        if reads_weights:  # representatives are chosen on expert weights (streaming reads the layer here)
            enter_layer(layer.index, layer.decoder_layer, None)
        for c in cl:
            rep = _representative(layer, c)
            if len(cl) <= merge_max and len(c) > 1:
                _average_into(layer, c, rep)
            survivors.append(rep)
        if reads_weights:
            leave_layer(layer.index, layer.decoder_layer, None)
        keep[layer.index] = sorted(survivors)
    return keep


@torch.no_grad()
def expert_weight_cosine(layer) -> float:
    """Mean pairwise cosine similarity of one MoE layer's experts, over every pair i < j.

    Each expert is one vector: its weight matrices (``gate_up_proj`` and ``down_proj``; biases
    left out) flattened and joined, the representation STUN's survivor choice uses. The Gram matrix
    is summed one matrix at a time, so no flattened copy of all the experts is held.
    """
    n = layer.num_experts
    if n < 2:
        raise ValueError(f"layer {layer.index} has {n} expert(s); a pairwise cosine needs at least 2")
    gram = torch.zeros(n, n, dtype=torch.float64)
    for w in layer.expert_matrices().values():
        flat = w.detach().flatten(1).float()
        gram += (flat @ flat.T).double().cpu()
    norms = gram.diagonal().sqrt()
    if bool((norms == 0).any()):
        raise ValueError(
            f"layer {layer.index}: experts {torch.nonzero(norms == 0).flatten().tolist()} are all zeros; their cosine is undefined"
        )
    cos = gram / (norms[:, None] * norms[None, :])
    i, j = torch.triu_indices(n, n, offset=1)
    return float(cos[i, j].mean())


__all__ = ["stun", "expert_distances", "expert_weight_cosine", "greedy_clusters", "DISTANCES"]
