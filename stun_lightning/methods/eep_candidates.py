"""EEP's candidates and how one is written into the model: per depth group a mixing matrix ``M``
(new experts as weighted sums of the original ones) and the router row ``T`` each new expert takes.
The search over them is :mod:`.eep`."""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import MoELayer


@dataclass
class Candidate:
    M: list[torch.Tensor]  # per group [E', E] float64
    T: list[list[int]]  # per group: original router row of each new expert (one-hot rows of T)

    def key(self) -> str:
        """Identity of the candidate (a digest: an E'xE matrix per group is too big to keep as a tuple)."""
        digest = hashlib.sha1(repr(self.T).encode())
        for m in self.M:
            digest.update(m.contiguous().numpy().tobytes())
        return digest.hexdigest()

    def copy(self) -> "Candidate":
        return Candidate([m.clone() for m in self.M], [list(t) for t in self.T])


def slots(T: list[int], num_experts: int) -> list[int]:
    """Expert slot each new expert is written to: its router row's expert, or a free one if taken."""
    taken, out = set(), []
    for s in T:
        out.append(s if s not in taken else -1)
        taken.add(s)
    free = iter(e for e in range(num_experts) if e not in taken)
    return [s if s >= 0 else next(free) for s in out]


class _Groups:
    """MoE layers split into depth groups sharing coefficients, and how to install a candidate."""

    def __init__(self, layers: list[MoELayer], keep: dict[int, int], groups: int | str):
        n = len(layers)
        if groups == "layer":
            groups = n
        if not isinstance(groups, int) or groups < 1:
            raise ValueError(f"EEP groups must be a positive number of depth groups or 'layer', got {groups!r}")
        g = min(groups, n)
        size = n // g  # the official split: equal groups, the remainder in the last one
        self.layers = [layers[i * size : (i + 1) * size] if i < g - 1 else layers[i * size :] for i in range(g)]
        self.shapes = []
        for members in self.layers:
            shapes = {(lay.num_experts, keep[lay.index]) for lay in members}
            if len(shapes) > 1:
                raise ValueError(
                    f"EEP group of layers {[lay.index for lay in members]} mixes expert counts {sorted(shapes)}; use groups='layer'"
                )
            self.shapes.append(shapes.pop())
        self.originals = {
            lay.index: (
                dict(lay.experts.named_parameters(recurse=False)),
                {
                    name: getattr(lay.router, name)
                    for name in lay.adapter.router_expert_tensors
                    if getattr(lay.router, name, None) is not None
                },
                lay.top_k,
            )
            for lay in layers
        }

    def signature(self) -> list:
        return [
            [(lay.index, lay.num_experts) for lay in members] + [shape]
            for members, shape in zip(self.layers, self.shapes)
        ]

    def tensors(self, lay: MoELayer, M: torch.Tensor, T: list[int]):
        """(expert tensors, router tensors) of one layer under (M, T), experts ordered by slot."""
        experts, router, _ = self.originals[lay.index]
        where = slots(T, lay.num_experts)
        order = sorted(range(len(T)), key=where.__getitem__)
        rows = torch.tensor([T[j] for j in order])
        mix = M[order]
        out_e = {
            name: (mix.to(p.device, p.dtype) @ p.detach().flatten(1)).view(len(T), *p.shape[1:])
            for name, p in experts.items()
        }
        out_r = {name: t.detach()[rows.to(t.device)] for name, t in router.items()}
        return out_e, out_r

    @contextlib.contextmanager
    def installed(self, cand: Candidate):
        """The model computes as the candidate inside the block; originals are restored after."""
        try:
            for g, members in enumerate(self.layers):
                for lay in members:
                    new_e, new_r = self.tensors(lay, cand.M[g], cand.T[g])
                    for name, t in new_e.items():
                        setattr(lay.experts, name, nn.Parameter(t, requires_grad=False))
                    for name, t in new_r.items():
                        setattr(
                            lay.router,
                            name,
                            nn.Parameter(t, requires_grad=False)
                            if isinstance(self.originals[lay.index][1][name], nn.Parameter)
                            else t,
                        )
                    _set_counts(lay, len(cand.T[g]), min(self.originals[lay.index][2], len(cand.T[g])))
            yield
        finally:
            for members in self.layers:
                for lay in members:
                    experts, router, top_k = self.originals[lay.index]
                    for name, t in experts.items():
                        setattr(lay.experts, name, t)
                    for name, t in router.items():
                        setattr(lay.router, name, t)
                    _set_counts(lay, next(iter(experts.values())).shape[0], top_k)

    @torch.no_grad()
    def apply(self, cand: Candidate) -> dict[int, list[int]]:
        """Write the candidate into the full-size tensors (merged experts into their slots) and
        return the slots to keep; slicing them gives the model the candidate was evaluated as."""
        keep = {}
        for g, members in enumerate(self.layers):
            for lay in members:
                s = sorted(slots(cand.T[g], lay.num_experts))
                new_e, new_r = self.tensors(lay, cand.M[g], cand.T[g])
                experts, router, _ = self.originals[lay.index]
                for originals, new in ((experts, new_e), (router, new_r)):
                    for name, t in new.items():
                        originals[name][torch.tensor(s, device=t.device)] = t
                keep[lay.index] = s
        return keep


def _set_counts(lay: MoELayer, num_experts: int, top_k: int) -> None:
    for module in (lay.experts, lay.router):
        if hasattr(module, "num_experts"):
            module.num_experts = num_experts
    for module in (lay.router, lay.block):
        if hasattr(module, "top_k"):
            module.top_k = top_k
