"""Honest sparsity accounting: every figure is counted from the tensors' actual zeros.

STUN reports sparsity over expert parameters: ``1 - nonzero expert weights left / expert weights of
the original model``, so removed experts count as fully sparse. We report that, the sparsity inside
the surviving experts, per layer, and over the whole model (attention and embeddings included).
Zeros inside a dense tensor save no memory until the model is exported compactly; removed experts
save memory at once: both byte counts are reported.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .adapters import moe_layers
from .sharding import count_nonzero


@dataclass
class ParamCount:
    total: int = 0
    nonzero: int = 0
    bytes: int = 0

    def add(self, t: torch.Tensor) -> None:
        self.total += t.numel()
        self.nonzero += count_nonzero(t)  # over all shards of a sharded tensor (a collective)
        self.bytes += t.numel() * t.element_size()

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.total if self.total else 0.0


@dataclass
class ModelCensus:
    """Parameter counts of a model: whole model and per MoE layer's routed experts."""

    model: ParamCount
    experts: dict[int, ParamCount]
    num_experts: dict[int, int]

    @classmethod
    def of(cls, model: nn.Module) -> "ModelCensus":
        whole = ParamCount()
        seen = set()
        for p in model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                whole.add(p)
        experts, counts = {}, {}
        for layer in moe_layers(model):
            c = ParamCount()
            for _, p in layer.expert_parameters():
                c.add(p)
            experts[layer.index] = c
            counts[layer.index] = layer.num_experts
        return cls(whole, experts, counts)

    @property
    def expert_total(self) -> ParamCount:
        out = ParamCount()
        for c in self.experts.values():
            out.total += c.total
            out.nonzero += c.nonzero
            out.bytes += c.bytes
        return out


@dataclass
class PruneReport:
    recipe: dict
    experts_before: dict[int, int]
    experts_after: dict[int, int]
    removed_experts: dict[int, list[int]]
    layer_sparsity: dict[int, float]  # over the layer's original expert parameters
    within_expert_sparsity: float  # zeros inside surviving experts
    expert_param_sparsity: float  # STUN's total: over all original expert parameters
    model_sparsity: float  # over every parameter of the original model
    params_before: int
    params_after: int  # dense storage after expert removal
    nonzero_after: int
    bytes_before: int
    bytes_after: int  # dense storage, what the model uses in memory now
    layer_target_sparsity: dict[int, float] = field(default_factory=dict)
    low_token_experts: dict[int, list[int]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    layer_passes: dict[str, int] = field(default_factory=dict)
    perplexity: dict[str, float] = field(default_factory=dict)
    base_model: str = ""  # what was pruned (hub id or path), for the model card
    expert_split: dict = field(default_factory=dict)  # expert_sparsity="auto": what stun_lightning.split chose
    figures: dict = field(
        default_factory=dict
    )  # data behind `stun-lightning report`'s pictures (stun_lightning.figures)

    @classmethod
    def compare(
        cls, before: ModelCensus, after: ModelCensus, recipe: dict, removed: dict[int, list[int]], **extra
    ) -> "PruneReport":
        layer_sparsity = {i: 1.0 - after.experts[i].nonzero / before.experts[i].total for i in before.experts}
        kept_total = after.expert_total
        return cls(
            recipe=recipe,
            experts_before=dict(before.num_experts),
            experts_after=dict(after.num_experts),
            removed_experts={i: sorted(v) for i, v in removed.items() if v},
            layer_sparsity=layer_sparsity,
            within_expert_sparsity=kept_total.sparsity,
            expert_param_sparsity=1.0 - kept_total.nonzero / before.expert_total.total,
            model_sparsity=1.0 - after.model.nonzero / before.model.total,
            params_before=before.model.total,
            params_after=after.model.total,
            nonzero_after=after.model.nonzero,
            bytes_before=before.model.bytes,
            bytes_after=after.model.bytes,
            **extra,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    def summary_rows(self) -> list[tuple[str, str]]:
        rows = [
            ("experts (all MoE layers)", f"{sum(self.experts_before.values())} -> {sum(self.experts_after.values())}"),
            ("experts per layer", " ".join(str(self.experts_after[i]) for i in sorted(self.experts_after))),
            ("parameters (dense storage)", f"{self.params_before:,} -> {self.params_after:,}"),
            ("nonzero parameters", f"{self.nonzero_after:,}"),
            ("memory (dense storage)", f"{self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB"),
            ("sparsity over expert params (STUN)", f"{self.expert_param_sparsity:.2%}"),
            ("sparsity inside kept experts", f"{self.within_expert_sparsity:.2%}"),
            ("sparsity over the whole model", f"{self.model_sparsity:.2%}"),
        ]
        for name, value in self.perplexity.items():
            rows.append((f"perplexity {name}", f"{value:.3f}"))
        for name, value in self.seconds.items():
            rows.append((f"time {name}", f"{value:.2f} s"))
        if self.expert_split:
            removed = self.expert_split["removed"]
            label = "error-curve budget" if self.expert_split.get("budget") == "error_curve" else "auto split"
            rows.append((f"{label}: experts removed per layer", " ".join(str(removed[i]) for i in sorted(removed))))
            if "within" in self.expert_split:
                within = self.expert_split["within"]
                rows.append(
                    (
                        "auto split: survivor sparsity at the common target",
                        " ".join(f"{within[i]:.1%}" for i in sorted(within)),
                    )
                )
            if "losses" in self.expert_split:
                losses = self.expert_split["losses"]
                rows.append(
                    (
                        "auto split: held-out loss by removal fraction",
                        " ".join(f"{f:g}: {loss:.4f}" for f, loss in losses.items()),
                    )
                )
        if self.low_token_experts:
            rows.append(("experts with too few calibration tokens", json.dumps(self.low_token_experts)))
        return rows

    def to_markdown(self) -> str:
        lines = ["| quantity | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in self.summary_rows()]
        lines += ["", "| layer | experts | removed | sparsity over layer's expert params |", "|---|---|---|---|"]
        for i in sorted(self.experts_before):
            lines.append(
                f"| {i} | {self.experts_before[i]} -> {self.experts_after[i]} | {self.removed_experts.get(i, [])} | {self.layer_sparsity[i]:.2%} |"
            )
        return "\n".join(lines)
