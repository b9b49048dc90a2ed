"""``split_groups``: the non-uniform refinement of the ``model_loss`` choice.

After the uniform removal fraction is chosen, the MoE layers are cut into ``split_groups`` groups of
consecutive layers. Group by group (one pass, from the first layers to the last), each layer of the
group moves to its next candidate removal count up, and separately down; both moves are scored like
the uniform candidates, and the better one is kept only when its held-out loss gain over the
current choice beats a paired margin: with ``d_b`` the loss difference (current minus moved) on
held-out block ``b``, ``mean(d) > split_margin * SE(d)``, ``SE = std(d) / sqrt(n)`` over the ``n``
held-out blocks (with one block no move is taken unless ``split_margin`` is 0). The default margin,
2 standard errors, is about a one-sided 95% test on the default 8 held-out blocks: the held-out
blocks also choose, so a gain within their noise is not taken. Every layer meets
the total on its own (its survivors' sparsity is re-solved for its new expert count), so the total
stays exact. Cost: at most two scored candidates per group, whatever the expert count.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def layer_groups(indices: list[int], groups: int) -> list[list[int]]:
    """``indices`` cut into ``min(groups, len(indices))`` runs of consecutive layers whose sizes
    differ by at most one (the earlier runs the longer)."""
    n = max(1, min(groups, len(indices)))
    size, extra = divmod(len(indices), n)
    out, start = [], 0
    for g in range(n):
        end = start + size + (g < extra)
        out.append(list(indices[start:end]))
        start = end
    return out


def moved(
    counts: dict[int, int], options: dict[int, list[int]], group: list[int], direction: int
) -> dict[int, int] | None:
    """``counts`` with every layer of ``group`` at its next larger (``direction=1``) or smaller (-1)
    removal of ``options[i]`` (sorted feasible counts), layers at an end staying; None when no layer
    of the group can move."""
    out, changed = dict(counts), False
    for i in group:
        steps = [r for r in options[i] if (r > counts[i] if direction > 0 else r < counts[i])]
        if steps:
            out[i] = min(steps) if direction > 0 else max(steps)
            changed = True
    return out if changed else None


def paired_gain(current: torch.Tensor, candidate: torch.Tensor) -> tuple[float, float]:
    """(mean per-block loss gain of ``candidate`` over ``current``, its standard error; inf for one block)."""
    d = current.double() - candidate.double()
    se = float(d.std(unbiased=True)) / math.sqrt(d.numel()) if d.numel() > 1 else math.inf
    return float(d.mean()), se


def beats_margin(gain: float, se: float, margin: float) -> bool:
    """Whether a move's gain beats ``margin`` paired standard errors (and is positive)."""
    if gain <= 0:
        return False
    return margin == 0 or gain > margin * se


def refine_counts(
    counts: dict[int, int],
    options: dict[int, list[int]],
    groups: list[list[int]],
    score: Callable[[dict[int, int]], object],
    current,
    margin: float,
) -> tuple[dict[int, int], object, list[dict]]:
    """(removal counts, their score, every move tried) after one pass of group moves from ``counts``
    scored ``current``. ``score(counts)`` returns an object with ``block_losses`` (``[held-out
    blocks]``) and ``loss``; at most ``2 * len(groups)`` calls."""
    tried = []
    for g, group in enumerate(groups):
        best = None
        for direction in (1, -1):
            proposal = moved(counts, options, group, direction)
            if proposal is None:
                continue
            result = score(proposal)
            gain, se = paired_gain(current.block_losses, result.block_losses)
            record = dict(
                group=g,
                direction=direction,
                removed=dict(proposal),
                loss=round(result.loss, 6),
                gain=round(gain, 6),
                se=round(se, 6) if math.isfinite(se) else None,  # one held-out block: no error estimate
                accepted=False,
            )
            tried.append(record)
            if beats_margin(gain, se, margin) and (best is None or gain > best[2]):
                best = (proposal, result, gain, record)
        if best is not None:
            counts, current = best[0], best[1]
            best[3]["accepted"] = True
    return counts, current, tried
