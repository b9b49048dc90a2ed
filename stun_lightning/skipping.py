"""NAEE dynamic expert skipping: at inference, drop a token's second expert when its gate is small.

Lu et al., "Not All Experts are Equal" (ACL 2024; Lucky-Lance/Expert_Sparsity @16067c0,
``method/dynamic_skipping.py``): per MoE layer, beta_l = the median over calibration tokens of
w_2nd / w_1st (the token's two routing weights); at inference the second expert is skipped when
``w_2nd < beta_l * w_1st``. Defined for top-2 routing only (the official code asserts it).

    betas = skipping_betas(model, calibration_ids)
    handle = enable_dynamic_skipping(model, betas)   # forward hooks on the routers
    ...
    handle.remove()

Deviations: (1) the ratio is read from the weights the model's own router hands its experts;
for softmax routers it equals the official softmax-over-all-experts ratio, since renormalising the
top-2 does not change a ratio. (2) A skipped token's first expert receives the skipped weight
(``w_1st + w_2nd``): the official code renormalises, giving 1.0, which is the same number for
renormalised routers and keeps the gate's scale for routers that do not renormalise. (3) The
skipped slot is handed to the experts as the empty-slot index ``num_experts`` (the convention
transformers' expert implementations use for expert-parallel sentinels), so the expert is really
not computed; an experts implementation that cannot take that index is refused when enabling.
Betas are recorded in ``config.stun_skipping_betas`` so a saved model can re-enable skipping with
``enable_dynamic_skipping(model)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from .adapters import MoELayer, moe_layers
from .calibration import ROUTING, calibrate

BETAS_FIELD = "stun_skipping_betas"


class SkippingUnsupportedError(ValueError):
    """Dynamic skipping cannot be installed on this model."""


def _check_top2(layers: list[MoELayer]) -> None:
    bad = {layer.index: layer.top_k for layer in layers if layer.top_k != 2}
    if bad:
        raise SkippingUnsupportedError(
            f"NAEE dynamic skipping is defined for top-2 routing (it skips the second expert); layers {sorted(bad)} "
            f"route to top-k={sorted(set(bad.values()))}"
        )


@torch.no_grad()
def skipping_betas(
    model: nn.Module, input_ids: torch.Tensor, *, batch_size: int = 8, device=None, progress: bool = False
) -> dict[int, float]:
    """beta_l = median over calibration tokens of w_2nd / w_1st, per MoE layer (one routing pass)."""
    layers = moe_layers(model)
    _check_top2(layers)
    ratios: dict[int, list[torch.Tensor]] = {layer.index: [] for layer in layers}
    handles = []
    for layer in layers:

        def hook(module, args, index=layer.index):
            w = args[2].detach().float()
            hi, lo = w.max(dim=-1).values, w.min(dim=-1).values
            ratios[index].append((lo / hi.clamp_min(torch.finfo(torch.float32).tiny)).cpu())

        handles.append(layer.experts.register_forward_pre_hook(hook))
    try:
        calibrate(
            model,
            input_ids,
            collect=(ROUTING,),
            batch_size=batch_size,
            device=device,
            progress=progress,
            desc="skipping betas",
        )
    finally:
        for h in handles:
            h.remove()
    return {i: _median(torch.cat(r)) for i, r in ratios.items()}


def _median(x: torch.Tensor) -> float:
    """numpy's median (the official): the mean of the two middle values for an even count."""
    v = x.double().sort().values
    n = v.numel()
    return float(v[n // 2]) if n % 2 else float((v[n // 2 - 1] + v[n // 2]) / 2)


@dataclass
class SkippingHandle:
    """Installed skipping hooks; ``remove()`` restores normal routing. Counts what was skipped."""

    handles: list = field(default_factory=list)
    routed: dict[int, int] = field(default_factory=dict)  # top-2 slots seen per layer
    skipped: dict[int, int] = field(default_factory=dict)  # of which skipped

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def skip_rate(self) -> float:
        return sum(self.skipped.values()) / max(1, sum(self.routed.values()))

    def __enter__(self) -> "SkippingHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _check_sentinel(layer: MoELayer) -> None:
    """Refuse experts implementations that cannot take the empty-slot index ``num_experts``."""
    experts = layer.experts
    E = layer.num_experts
    p = experts.gate_up_proj
    hidden = p.shape[1] if layer.adapter.transposed else p.shape[2]
    x = torch.zeros(1, hidden, dtype=p.dtype, device=p.device)
    try:
        with torch.no_grad():
            experts(
                x, torch.tensor([[0, E]], device=p.device), torch.tensor([[1.0, 0.0]], dtype=p.dtype, device=p.device)
            )
    except (RuntimeError, IndexError) as err:
        raise SkippingUnsupportedError(
            f"{type(experts).__name__} cannot skip a routed slot: its forward rejects the empty-slot index {E} ({err}). "
            "Dynamic skipping needs an experts implementation that accepts it (the eager experts of Mixtral, "
            "Qwen-MoE, OLMoE and DeepSeek-V3, or config._experts_implementation='grouped_mm')."
        ) from err


def enable_dynamic_skipping(model: nn.Module, betas: Mapping[int, float] | None = None) -> SkippingHandle:
    """Install NAEE skipping on every MoE layer; ``betas`` default to ``config.stun_skipping_betas``."""
    layers = moe_layers(model)
    _check_top2(layers)
    if betas is None:
        recorded = getattr(model.config, BETAS_FIELD, None)
        if not recorded:
            raise ValueError(
                f"no betas given and none recorded in config.{BETAS_FIELD}: compute them with skipping_betas(model, calibration_ids)"
            )
        betas = {int(k): float(v) for k, v in recorded.items()}
    missing = [layer.index for layer in layers if layer.index not in betas]
    if missing:
        raise ValueError(f"no skipping beta for MoE layers {missing}")
    for layer in layers:
        _check_sentinel(layer)
    handle = SkippingHandle()
    for layer in layers:
        handle.routed[layer.index] = handle.skipped[layer.index] = 0

        def hook(module, args, output, index=layer.index, beta=float(betas[layer.index]), E=layer.num_experts):
            logits, weights, experts = output[0], output[1], output[2]
            w = weights.float()
            second = w.argmin(dim=-1, keepdim=True)  # DeepSeek's top-k is unsorted: find the smaller gate
            w_hi, w_lo = w.max(dim=-1).values, w.min(dim=-1).values
            skip = (w_lo < beta * w_hi)[:, None]
            slot = torch.zeros_like(experts, dtype=torch.bool).scatter_(1, second, True) & skip
            new_weights = torch.where(
                slot,
                torch.zeros_like(weights),
                weights + torch.where(skip & ~slot, (w_lo[:, None]).to(weights.dtype), 0),
            )
            new_experts = torch.where(slot, torch.full_like(experts, E), experts)
            handle.routed[index] += int(experts.numel())
            handle.skipped[index] += int(slot.sum())
            return (logits, new_weights, new_experts, *output[3:])

        handle.handles.append(layer.router.register_forward_hook(hook))
    setattr(model.config, BETAS_FIELD, {str(k): float(v) for k, v in betas.items()})
    return handle


__all__ = ["enable_dynamic_skipping", "skipping_betas", "SkippingHandle", "SkippingUnsupportedError", "BETAS_FIELD"]
