"""What expert-wise distillation reads from a model's own forward pass (``stun_lightning.distill``):
forward hooks on every MoE layer recording the experts' input tokens and routing, and optionally
the MoE block's output and the router's logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adapters import moe_layers


@dataclass
class CapturedLayer:
    hidden: torch.Tensor  # [T, H] input of the fused experts module
    index: torch.Tensor  # [T, k] routed experts
    block_output: torch.Tensor | None = None  # [B, L, H] MoE block output (routed + shared)
    router_logits: torch.Tensor | None = None  # [T, E] router logits (the router's first output)


class MoECapture:
    """Forward hooks recording, for every MoE layer, the experts' input tokens and routing, and
    optionally the MoE block's output and the router's logits, during a model's own forward pass.

    ``detach=True`` for the teacher (nothing kept for autograd). Records are replaced on every
    forward; :meth:`clear` drops them, :meth:`close` removes the hooks.
    """

    def __init__(self, model: nn.Module, *, detach: bool, block_outputs: bool = False, router_logits: bool = False):
        self.layers = {layer.index: layer for layer in moe_layers(model)}
        self.detach = detach
        self.records: dict[int, CapturedLayer] = {}
        self.enabled = True
        self.on_record = None  # called as on_record(layer index, record) inside the layer's forward
        self._handles = []
        self._router_logits: dict[int, torch.Tensor] = {}  # the router runs before the experts' pre-hook
        for i, layer in self.layers.items():
            if router_logits:
                self._handles.append(layer.router.register_forward_hook(self._on_router(i)))
            self._handles.append(layer.experts.register_forward_pre_hook(self._on_experts(i)))
            if block_outputs:
                self._handles.append(layer.block.register_forward_hook(self._on_block(i)))

    def _on_experts(self, i: int):
        def hook(module, args):
            if not self.enabled:
                return
            hidden, index = args[0], args[1]
            if self.detach:
                hidden = hidden.detach()
            self.records[i] = CapturedLayer(hidden, index.detach(), router_logits=self._router_logits.pop(i, None))
            if self.on_record is not None:
                self.on_record(i, self.records[i])

        return hook

    def _on_router(self, i: int):
        def hook(module, args, output):
            if self.enabled:
                logits = output[0] if isinstance(output, tuple) else output
                self._router_logits[i] = logits.detach() if self.detach else logits

        return hook

    def _on_block(self, i: int):
        def hook(module, args, output):
            if not self.enabled or i not in self.records:
                return
            out = output[0] if isinstance(output, tuple) else output
            self.records[i].block_output = out.detach() if self.detach else out

        return hook

    def clear(self) -> None:
        self.records, self._router_logits = {}, {}

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.records = {}
