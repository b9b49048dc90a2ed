"""Forward hooks that fill a :class:`~stun_lightning.layer_stats.LayerStats` while a calibration pass
(or training, ``stun_lightning.activation_stats``) runs: on one MoE block (the router's logits, the
experts' routed tokens and their inputs) and on every ``nn.Linear`` of one decoder layer."""

from __future__ import annotations

import torch
from torch import nn

from .adapters import MoELayer
from .layer_stats import NORMS, SALIENCY, LayerStats


class MoECollector:
    """Forward hooks on one MoE block that accumulate a LayerStats."""

    def __init__(self, layer: MoELayer, collect: set[str], keep_block_io: int):
        E = layer.num_experts
        self.layer, self.collect, self.keep_block_io = layer, collect, keep_block_io
        self.stats = LayerStats(layer.index, E, layer.top_k)
        dev = layer.router_weight.device
        s = self.stats
        s.expert_tokens = torch.zeros(E, dtype=torch.long, device=dev)
        s.gate_sum = torch.zeros(E, dtype=torch.float64, device=dev)
        s.coactivation = torch.zeros(E, E, dtype=torch.float64, device=dev)
        s.router_logit_sum = torch.zeros(E, dtype=torch.float64, device=dev)
        if SALIENCY in collect:
            s.saliency_sum = torch.zeros(E, dtype=torch.float64, device=dev)
            s.output_norm_sum = torch.zeros(E, dtype=torch.float64, device=dev)
        if NORMS in collect:
            for name, w in layer.expert_matrices().items():
                s.input_sq[name] = torch.zeros(E, w.shape[2], dtype=torch.float32, device=dev)
                s.input_sq_gated[name] = torch.zeros(E, w.shape[2], dtype=torch.float32, device=dev)
        self.handles = [
            layer.experts.register_forward_pre_hook(self._on_experts),
            layer.router.register_forward_hook(self._on_router),
        ]
        if keep_block_io:
            self.handles.append(layer.block.register_forward_hook(self._on_block))

    def close(self) -> LayerStats:
        for h in self.handles:
            h.remove()
        return self.stats.map_summed(lambda t: t.cpu())

    def _on_router(self, module, args, output):
        logits = output[0] if isinstance(output, tuple) else output
        self.stats.router_logit_sum += logits.detach().double().reshape(-1, logits.shape[-1]).sum(0)

    def _on_block(self, module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        kept = sum(t.shape[0] for t in self.stats.block_inputs)
        if kept < self.keep_block_io:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            y = out.detach().reshape(-1, out.shape[-1])
            room = self.keep_block_io - kept
            self.stats.block_inputs.append(x[:room].cpu())
            self.stats.block_outputs.append(y[:room].cpu())

    @torch.no_grad()
    def _on_experts(self, module, args):
        hidden, index, weights = args[0], args[1], args[2]
        s, E = self.stats, self.stats.num_experts
        T = hidden.shape[0]
        s.tokens += T
        valid = index < E  # some implementations pad with index E
        onehot = torch.zeros(T, E + 1, dtype=torch.float64, device=hidden.device)
        onehot.scatter_(1, index.clamp(max=E).long(), 1.0)
        onehot = onehot[:, :E]
        s.expert_tokens += onehot.sum(0).long().to(s.expert_tokens.device)
        s.coactivation += (onehot.t() @ onehot).to(s.coactivation.device)
        s.gate_sum.index_add_(
            0, index[valid].long().to(s.gate_sum.device), weights[valid].double().to(s.gate_sum.device)
        )
        if SALIENCY in self.collect:
            for e in torch.unique(index[valid]).tolist():
                tok, pos = torch.where(index == e)
                out = self.layer.adapter.expert_output(module, e, hidden[tok]).double()
                norms = out.norm(dim=-1)
                s.saliency_sum[e] += (weights[tok, pos].double() * norms).sum().to(s.saliency_sum.device)
                s.output_norm_sum[e] += norms.sum().to(s.output_norm_sum.device)
        if NORMS not in self.collect:
            return
        x = hidden.float()
        for e in torch.unique(index[valid]).tolist():
            tok, pos = torch.where(index == e)
            g = weights[tok, pos].float()[:, None]
            xe = x[tok]
            s.input_sq["gate_up_proj"][e] += xe.square().sum(0)
            s.input_sq_gated["gate_up_proj"][e] += (xe * g).square().sum(0)
            h = self.layer.adapter.expert_hidden(module, e, hidden[tok]).float()
            s.input_sq["down_proj"][e] += h.square().sum(0)
            s.input_sq_gated["down_proj"][e] += (h * g).square().sum(0)


class LinearCollector:
    """Input sums of squares of every ``nn.Linear`` inside one decoder layer."""

    def __init__(self, decoder_layer: nn.Module):
        self.sq: dict[str, torch.Tensor] = {}
        self.handles = [
            module.register_forward_pre_hook(self._hook(name))
            for name, module in decoder_layer.named_modules()
            if isinstance(module, nn.Linear)
        ]

    def _hook(self, name):
        def hook(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            total = x.square().sum(0)
            self.sq[name] = self.sq[name] + total if name in self.sq else total

        return hook

    def close(self) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        return {k: v.cpu() for k, v in self.sq.items()}
