"""Change what routers choose without touching a weight: force experts' router logits to ``-inf``.

Used to evaluate an expert subset with the model's own routing (NAEE's enumeration, progressive
pruning) and by tests comparing surgery with masking. Every supported router computes its logits
with one ``torch.nn.functional.linear`` call on its ``weight`` (DeepSeek-V3 on an fp32 copy of it,
GPT-OSS with a bias); while a masked router runs, that call's output gets the dropped columns set
to ``-inf``, and the router's own softmax / sigmoid / top-k / renormalisation follow unchanged.

For softmax routers (renormalised or not) and GPT-OSS's top-k softmax this equals removing the
experts with :func:`stun_lightning.surgery.keep_experts`; for DeepSeek-V3's sigmoid, group-limited
router it does when the same number of experts is dropped from every expert group.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import MoELayer, moe_layers

_ORIGINAL_LINEAR = F.linear
_patches = 0  # nesting depth of active masks (F.linear is restored when it returns to 0)
_running: list[
    tuple[tuple[int, ...], Sequence[int]]
] = []  # (router weight shape, experts to mask) per router now running


def _masked_linear(input, weight, bias=None):
    out = _ORIGINAL_LINEAR(input, weight, bias)
    if _running:
        shape, cols = _running[-1]
        if cols and tuple(weight.shape) == shape:  # the router's logits (possibly on a dtype-cast copy)
            out = out.clone()
            out[..., list(cols)] = float("-inf")
    return out


@contextlib.contextmanager
def router_logits_forced_to_minus_inf(
    model_or_layers: nn.Module | Sequence[MoELayer], drop: Mapping[int, Sequence[int]]
) -> Iterator[None]:
    """Within the block, the experts ``drop[i]`` of MoE layer i get router logit ``-inf``.

    ``drop`` is read each time a router runs, so a caller may change it inside the block (NAEE
    tries one subset after another; progressive pruning adds layers as it goes). Layers absent from
    ``drop`` route as usual.
    """
    global _patches
    layers = moe_layers(model_or_layers) if isinstance(model_or_layers, nn.Module) else list(model_or_layers)
    handles = []
    for layer in layers:

        def enter(module, args, index=layer.index):
            _running.append((tuple(module.weight.shape), drop.get(index, ())))

        def leave(module, args, output):
            _running.pop()

        handles.append(layer.router.register_forward_pre_hook(enter))
        handles.append(layer.router.register_forward_hook(leave, always_call=True))
    if _patches == 0:
        torch.nn.functional.linear = _masked_linear
    _patches += 1
    try:
        yield
    finally:
        _patches -= 1
        if _patches == 0:
            torch.nn.functional.linear = _ORIGINAL_LINEAR
        for h in handles:
            h.remove()


__all__ = ["router_logits_forced_to_minus_inf"]
