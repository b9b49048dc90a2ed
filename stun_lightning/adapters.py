"""Uniform access to the MoE blocks of Hugging Face transformers models.

transformers 5 keeps every family's routed experts as fused 3-D parameters (``gate_up_proj``
``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]``; GPT-OSS stores them transposed, interleaved and
with biases) behind a router module that returns ``(logits, top_k_weights, top_k_index)``.
Families differ only in where those modules live and which config field counts the experts;
an :class:`MoEAdapter` records exactly that, and nothing else in the library branches on the
family name.

Register a new family with::

    from stun_lightning.adapters import MoEAdapter, register_adapter
    register_adapter(MoEAdapter(model_types=("my_moe",), count_field="num_experts"))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model is not a transformers MoE family that stun-lightning knows."""


@dataclass(frozen=True)
class MoEAdapter:
    """Where a family keeps its MoE pieces.

    Attributes:
        model_types: ``config.model_type`` values this adapter serves.
        count_field: config field that counts routed experts per layer.
        router_attr / experts_attr: attribute names on the MoE block (``layer.mlp``).
        router_expert_tensors: router parameters/buffers with one entry per expert (sliced by surgery).
        shared_attrs: shared-expert modules, kept and never pruned.
        transposed: expert weights stored ``[E, in, out]`` (GPT-OSS) instead of ``[E, out, in]``.
        interleaved_gate_up: gate and up rows alternate (GPT-OSS) instead of gate rows then up rows.
        group_field / topk_group_field: expert-group routing (DeepSeek-V3); groups must stay even.
    """

    model_types: tuple[str, ...]
    count_field: str
    router_attr: str = "gate"
    experts_attr: str = "experts"
    router_expert_tensors: tuple[str, ...] = ("weight",)
    shared_attrs: tuple[str, ...] = ()
    transposed: bool = False
    interleaved_gate_up: bool = False
    group_field: str | None = None
    topk_group_field: str | None = None
    normalizes_top_k: Callable[[object], bool] = field(default=lambda config: True, compare=False)

    def expert_hidden(self, experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
        """Input of expert ``e``'s down projection for tokens ``x`` ``[T, H]``."""
        w = experts.gate_up_proj[e]
        if self.transposed:
            gate_up = x @ w
        else:
            gate_up = x @ w.t()
        bias = getattr(experts, "gate_up_proj_bias", None)
        if bias is not None:
            gate_up = gate_up + bias[e]
        if self.interleaved_gate_up:
            return experts._apply_gate(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return experts.act_fn(gate) * up

    def expert_output(self, experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
        """Unweighted output of expert ``e`` for tokens ``x`` ``[T, H]``."""
        h = self.expert_hidden(experts, e, x)
        w = experts.down_proj[e]
        out = h @ w if self.transposed else h @ w.t()
        bias = getattr(experts, "down_proj_bias", None)
        return out + bias[e] if bias is not None else out


_REGISTRY: dict[str, MoEAdapter] = {}


def register_adapter(adapter: MoEAdapter) -> MoEAdapter:
    """Make a family known to every stun-lightning function (later registrations win)."""
    for model_type in adapter.model_types:
        _REGISTRY[model_type] = adapter
    return adapter


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


register_adapter(MoEAdapter(model_types=("mixtral",), count_field="num_local_experts"))
register_adapter(
    MoEAdapter(
        model_types=("qwen2_moe",),
        count_field="num_experts",
        shared_attrs=("shared_expert", "shared_expert_gate"),
        normalizes_top_k=lambda config: bool(config.norm_topk_prob),
    )
)
register_adapter(
    MoEAdapter(
        model_types=("qwen3_moe",),
        count_field="num_experts",
        normalizes_top_k=lambda config: bool(config.norm_topk_prob),
    )
)
register_adapter(
    MoEAdapter(
        model_types=("olmoe",),
        count_field="num_experts",
        normalizes_top_k=lambda config: bool(config.norm_topk_prob),
    )
)
register_adapter(
    MoEAdapter(
        model_types=("deepseek_v3",),
        count_field="n_routed_experts",
        router_expert_tensors=("weight", "e_score_correction_bias"),
        shared_attrs=("shared_experts",),
        group_field="n_group",
        topk_group_field="topk_group",
        normalizes_top_k=lambda config: bool(config.norm_topk_prob),
    )
)
register_adapter(
    MoEAdapter(
        model_types=("gpt_oss",),
        count_field="num_local_experts",
        router_attr="router",
        router_expert_tensors=("weight", "bias"),
        transposed=True,
        interleaved_gate_up=True,
    )
)


def get_adapter(model_or_config) -> MoEAdapter:
    """The adapter of a model (or config); a clear error for anything else."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise UnsupportedModelError(
            f"stun-lightning has no adapter for model_type={model_type!r}. Supported: "
            f"{', '.join(supported_model_types())}. To add a family, describe where its MoE block "
            "keeps the router and the fused experts:\n"
            "    from stun_lightning.adapters import MoEAdapter, register_adapter\n"
            f"    register_adapter(MoEAdapter(model_types=({model_type!r},), count_field='num_experts',"
            " router_attr='gate', experts_attr='experts'))"
        )
    return _REGISTRY[model_type]


#: the fused expert matrices of every MoE block, ``[E, out, in]`` orientation (biases aside)
EXPERT_MATRICES = ("gate_up_proj", "down_proj")


@dataclass
class MoELayer:
    """One decoder layer's MoE block, seen through its family's adapter."""

    index: int  # decoder layer index
    decoder_layer: nn.Module
    block: nn.Module
    adapter: MoEAdapter

    @property
    def router(self) -> nn.Module:
        return getattr(self.block, self.adapter.router_attr)

    @property
    def experts(self) -> nn.Module:
        """The module holding the fused expert tensors, under any peft wrappers (see :func:`unwrap_experts`)."""
        return unwrap_experts(getattr(self.block, self.adapter.experts_attr))

    @property
    def num_experts(self) -> int:
        return self.experts.gate_up_proj.shape[0]

    @property
    def top_k(self) -> int:
        return self.router.top_k

    @property
    def router_weight(self) -> torch.Tensor:
        return self.router.weight

    def expert_matrices(self) -> dict[str, torch.Tensor]:
        """Fused expert weights as ``[E, out, in]`` views (transposed views for GPT-OSS)."""
        mats = {"gate_up_proj": self.experts.gate_up_proj, "down_proj": self.experts.down_proj}
        if self.adapter.transposed:
            mats = {k: v.transpose(1, 2) for k, v in mats.items()}
        return mats

    def expert_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Every parameter of the fused experts (weights and biases)."""
        return self.experts.named_parameters(recurse=False)


def unwrap_experts(module: nn.Module | None) -> nn.Module | None:
    """The fused-experts module under ``module``'s wrapper chain, or None when there is none.

    peft's LoRA on parameters (``LoraConfig(target_parameters=["experts.gate_up_proj", ...])``)
    replaces ``mlp.experts`` with nested ``ParamWrapper`` modules, one per targeted tensor, each
    keeping the module it wraps as ``.base_layer``. The wrappers call the innermost module's forward
    with unchanged arguments, so hooks, masks and surgery act on that module and its tensors; LoRA
    reaches those tensors only inside the wrappers' forward (``distill.lora_adapted``).
    """
    while module is not None and not hasattr(module, "gate_up_proj"):
        module = getattr(module, "base_layer", None)
    return module


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of a causal LM (``model.model.layers`` in every supported family;
    a peft ``PeftModel`` is looked through to the model it wraps)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no `model.layers` list of decoder layers; "
            "stun-lightning expects a transformers *ForCausalLM model."
        )
    return layers


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """All MoE blocks of ``model`` in layer order (dense MLP layers are skipped).

    Raises UnsupportedModelError for an unknown family or a model with no MoE block.
    """
    adapter = get_adapter(model)
    found = []
    for i, layer in enumerate(decoder_layers(model)):
        block = getattr(layer, "mlp", None)
        if block is not None and unwrap_experts(getattr(block, adapter.experts_attr, None)) is not None:
            found.append(MoELayer(i, layer, block, adapter))
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no MoE layers (no `mlp.{adapter.experts_attr}` with fused "
            "expert weights); nothing for expert pruning to act on."
        )
    return found
