"""What a calibration pass collects: :class:`LayerStats` per MoE layer (routing counts, gate sums,
co-activation, input norms, saliency, block inputs and outputs, dense-linear norms) and
:class:`CalibrationStats` for the whole pass; the names of what ``calibrate(collect=...)`` can
collect. Sums over tokens are marked so that batches, windows and ranks add up in one place."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable

import torch

ROUTING, NORMS, LINEAR, SALIENCY = "routing", "norms", "linear", "saliency"
_SUMMED = {"summed": True}


@dataclass
class LayerStats:
    """Calibration statistics of one MoE layer (expert axis = the layer's current experts)."""

    index: int
    num_experts: int
    top_k: int
    tokens: int = 0
    expert_tokens: torch.Tensor | None = field(default=None, metadata=_SUMMED)  # [E] routed tokens
    gate_sum: torch.Tensor | None = field(
        default=None, metadata=_SUMMED
    )  # [E] sum of gate values (router-weighted frequency)
    coactivation: torch.Tensor | None = field(
        default=None, metadata=_SUMMED
    )  # [E, E] tokens routed to both i and j (diag = counts)
    router_logit_sum: torch.Tensor | None = field(default=None, metadata=_SUMMED)  # [E]
    saliency_sum: torch.Tensor | None = field(
        default=None, metadata=_SUMMED
    )  # [E] sum over routed tokens of gate * ||expert output||_2
    output_norm_sum: torch.Tensor | None = field(
        default=None, metadata=_SUMMED
    )  # [E] sum over routed tokens of ||expert output||_2 (EAN)
    input_sq: dict[str, torch.Tensor] = field(
        default_factory=dict, metadata=_SUMMED
    )  # "gate_up_proj" / "down_proj" -> [E, in]
    input_sq_gated: dict[str, torch.Tensor] = field(default_factory=dict, metadata=_SUMMED)
    block_inputs: list[torch.Tensor] = field(default_factory=list)
    block_outputs: list[torch.Tensor] = field(default_factory=list)
    linear_sq: dict[str, torch.Tensor] = field(default_factory=dict, metadata=_SUMMED)  # dense nn.Linear name -> [in]

    # Fields marked ``_SUMMED`` are sums over tokens: statistics of several batches, windows or ranks
    # add up. These methods are the one place that lists them (the collector, the training-time
    # statistics, their checkpoints and the cross-rank reductions all go through them).

    def summed(self) -> list[tuple[str, str | None, torch.Tensor]]:
        """``(field, dict key or None, tensor)`` of every collected sum over tokens, in a fixed order."""
        out = []
        for f in fields(self):
            if not f.metadata.get("summed"):
                continue
            value = getattr(self, f.name)
            if isinstance(value, dict):
                out.extend((f.name, k, value[k]) for k in sorted(value))
            elif value is not None:
                out.append((f.name, None, value))
        return out

    def map_summed(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "LayerStats":
        """Replace every summed tensor ``t`` by ``fn(t)`` (e.g. move it, or all-reduce it); returns self."""
        for name, key, t in self.summed():
            if key is None:
                setattr(self, name, fn(t))
            else:
                getattr(self, name)[key] = fn(t)
        return self

    def summed_state(self) -> dict:
        """The token count and CPU copies of every summed tensor (a checkpointable dict)."""
        state: dict = {"tokens": self.tokens}
        for name, key, t in self.summed():
            copy = t.detach().cpu().clone()
            if key is None:
                state[name] = copy
            else:
                state.setdefault(name, {})[key] = copy
        return state

    def add_state(self, state: dict) -> None:
        """Add a :meth:`summed_state` of the same layer into these statistics."""
        self.tokens += int(state["tokens"])
        for name, key, t in self.summed():
            saved = state.get(name)
            saved = saved.get(key) if key is not None and saved is not None else saved
            if saved is not None:
                t += saved.to(t.device, t.dtype)

    def frequency(self) -> torch.Tensor:
        """Fraction of routed slots per expert."""
        return self.expert_tokens.double() / max(1, self.tokens * self.top_k)

    def input_norms(self, matrix: str, gated: bool = False) -> torch.Tensor:
        """``||X_j||_2`` per expert and input channel of ``matrix`` (``[E, in]``, fp32)."""
        source = self.input_sq_gated if gated else self.input_sq
        if matrix not in source:
            raise KeyError(f"no input norms for {matrix!r}: calibrate with collect including {NORMS!r}")
        return source[matrix].clamp_min(0).sqrt()

    def saliency(self) -> torch.Tensor:
        """REAP saliency per expert: mean over its routed tokens of gate x ``||output||_2`` (0 if never routed)."""
        if self.saliency_sum is None:
            raise KeyError(f"no saliency statistics: calibrate with collect including {SALIENCY!r}")
        return self.saliency_sum / self.expert_tokens.clamp_min(1).double()

    def low_token_experts(self, min_tokens: int = 1) -> list[int]:
        return [e for e, n in enumerate(self.expert_tokens.tolist()) if n < min_tokens]


@dataclass
class CalibrationStats:
    layers: dict[int, LayerStats]
    tokens: int
    seconds: float
    layer_passes: int  # forward passes of a decoder layer over the calibration set

    def __getitem__(self, index: int) -> LayerStats:
        return self.layers[index]

    def low_token_report(self, min_tokens: int = 1) -> dict[int, list[int]]:
        return {i: s.low_token_experts(min_tokens) for i, s in self.layers.items() if s.low_token_experts(min_tokens)}
