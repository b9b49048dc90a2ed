"""Masks on the surviving experts that stay in force while the model trains.

A :class:`ExpertMasks` holds one boolean keep-mask ``[E, out, in]`` per MoE layer and expert matrix
(the orientation of ``MoELayer.expert_matrices``). Enforcing it means three things, each a plain
function here so it is tested without a training framework:

* :func:`apply_masks`: masked weights set to exactly zero;
* :func:`mask_gradients`: masked gradient entries zeroed before the optimizer step, so gradient
  clipping measures, and the optimizer sees, only the live weights;
* :func:`mask_optimizer_state`: every per-parameter optimizer state tensor shaped like the weight
  (Adam's ``exp_avg`` / ``exp_avg_sq``, SGD's ``momentum_buffer``...) zeroed at masked entries, so
  momentum cannot revive a pruned weight (sparsegpt #17, filter-pruning-geometric-median #47).

Masks are computed by ``stun_lightning.unstructured.compute_masks`` (already-masked weights rank
below every live one, so masks only grow as the target sparsity rises). Masks are held
packed, one bit per expert weight on the CPU, plus one byte per weight of each parameter's own view
(its shard under FSDP2) on the parameter's device while it is enforced.

Sharded models (FSDP2, ``stun_lightning.sharding``): masks are always the full ``[E, out, in]``
tensors, kept on the CPU, identical on every rank; each rank enforces the rows of its own shard
(:meth:`ExpertMasks.local`, cached on the shard's device) on the local parameter, gradient and
optimizer state. ``compute_masks`` gathers one layer's full weights at a time (a collective:
every rank computes the same masks from the same statistics).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn

from .adapters import EXPERT_MATRICES, MoELayer, moe_layers
from .sharding import count_nonzero, is_sharded, local_mask, local_view


def _key(layer_index: int, matrix: str) -> str:
    return f"{layer_index}.{matrix}"


class ExpertMasks:
    """Keep-masks (True = keep) keyed ``"<decoder layer>.<matrix>"``, each ``[E, out, in]`` bool.

    Stored packed, one bit per weight on the CPU (every rank of a sharded fit holds all of them:
    1/8 of a byte per expert weight); :meth:`local` unpacks what one parameter needs (its shard under
    FSDP2, in its layout, on its device) and caches it until the mask is replaced. :attr:`masks`
    unpacks every mask (for inspection and tests)."""

    def __init__(self, masks: dict[str, torch.Tensor] | None = None) -> None:
        self._packed: dict[str, tuple[torch.Tensor, tuple[int, ...]]] = {}
        self._local: dict[str, torch.Tensor] = {}
        for key, mask in (masks or {}).items():
            self._set(key, mask)

    def __bool__(self) -> bool:
        return bool(self._packed)

    def __repr__(self) -> str:
        return f"ExpertMasks({len(self._packed)} masks, sparsity {self.sparsity():.4f})"

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Every mask unpacked (bool, CPU): a copy, for inspection."""
        return {k: self._unpack(k) for k in self._packed}

    def keys(self) -> list[str]:
        return list(self._packed)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed masks (the per-parameter caches of :meth:`local` not counted)."""
        return sum(bits.numel() for bits, _ in self._packed.values())

    def _unpack(self, key: str, device: torch.device | str = "cpu") -> torch.Tensor:
        bits, shape = self._packed[key]
        return unpack_bits(bits.to(device), shape)

    def _set(self, key: str, mask: torch.Tensor) -> None:
        self._packed[key] = (pack_bits(mask.bool()).cpu(), tuple(int(d) for d in mask.shape))
        self._local.pop(key, None)

    def get(self, layer_index: int, matrix: str) -> torch.Tensor | None:
        key = _key(layer_index, matrix)
        return self._unpack(key) if key in self._packed else None

    def set(self, layer_index: int, matrix: str, mask: torch.Tensor) -> None:
        self._set(_key(layer_index, matrix), mask)

    def local(self, layer_index: int, matrix: str, param: torch.Tensor, transposed: bool) -> torch.Tensor:
        """The keep-mask in ``param``'s layout, restricted to this rank's shard when ``param`` is
        sharded, on the parameter's device (cached until the mask is replaced)."""
        key = _key(layer_index, matrix)
        cached = self._local.get(key)
        if cached is not None and cached.device == local_view(param).device:
            return cached
        if not is_sharded(param):
            mask = _in_param_layout(self._unpack(key, param.device), param, transposed)
        else:  # the full mask is unpacked on the CPU, one matrix at a time, and only the shard moves
            mask = self._unpack(key)
            mask = local_mask(mask.transpose(1, 2) if transposed else mask, param)
        self._local[key] = mask
        return mask

    def shape(self, layer_index: int, matrix: str) -> tuple[int, ...] | None:
        entry = self._packed.get(_key(layer_index, matrix))
        return entry[1] if entry is not None else None

    def sparsity(self) -> float:
        total = kept = 0
        for key, (bits, shape) in self._packed.items():
            n = math.prod(shape)
            total += n
            kept += int(unpack_bits(bits, shape).sum())
        return 1.0 - kept / total if total else 0.0

    def equal(self, other: "ExpertMasks") -> bool:
        return self._packed.keys() == other._packed.keys() and all(
            a[1] == b[1] and torch.equal(a[0], b[0])
            for a, b in ((self._packed[k], other._packed[k]) for k in self._packed)
        )

    def state_dict(self) -> dict[str, dict]:
        """Masks packed to one bit per weight (CPU uint8) with their shapes."""
        return {k: {"shape": list(shape), "bits": bits.clone()} for k, (bits, shape) in self._packed.items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, dict]) -> "ExpertMasks":
        out = cls()
        for k, v in state.items():
            shape = tuple(int(d) for d in v["shape"])
            out._packed[k] = (v["bits"].to("cpu", torch.uint8), shape)
        return out


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8, eight entries per byte (little-endian within the byte), packed on
    the mask's own device."""
    flat = mask.detach().reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flat.device)
    return (flat.reshape(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, shape) -> torch.Tensor:
    """The bool tensor of ``shape`` that :func:`pack_bits` packed, on ``bits``' device."""
    n = math.prod(int(d) for d in shape)
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    flat = ((bits.to(torch.uint8)[:, None] >> shifts) & 1).reshape(-1)[:n]
    return flat.bool().reshape(list(shape))


def _param_views(layer: MoELayer) -> Iterator[tuple[str, nn.Parameter, bool]]:
    """(matrix name, parameter, stored transposed) for the layer's fused expert weights."""
    experts = layer.experts
    for name in EXPERT_MATRICES:
        yield name, getattr(experts, name), layer.adapter.transposed


def _in_param_layout(mask: torch.Tensor, param: torch.Tensor, transposed: bool) -> torch.Tensor:
    if mask.device != param.device:
        mask = mask.to(param.device)
    return mask.transpose(1, 2) if transposed else mask


def _check_shape(layer: MoELayer, name: str, shape: tuple[int, ...], param: torch.Tensor, transposed: bool) -> None:
    expected = param.transpose(1, 2).shape if transposed else param.shape
    if tuple(shape) != tuple(expected):
        raise ValueError(
            f"mask for layer {layer.index} {name} has shape {tuple(shape)} but the weight is {tuple(expected)}: "
            "the masks were computed for a different expert set (restore the expert sets before the masks)"
        )


def iter_masked(model: nn.Module, masks: ExpertMasks) -> Iterator[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, keep-mask in the parameter's own layout) for every masked expert weight; for a
    sharded parameter the mask covers this rank's shard (apply it to ``local_view`` of the tensors)."""
    for layer in moe_layers(model):
        for name, param, transposed in _param_views(layer):
            shape = masks.shape(layer.index, name)
            if shape is None:
                continue
            _check_shape(layer, name, shape, param, transposed)
            yield param, masks.local(layer.index, name, param, transposed)


@torch.no_grad()
def apply_masks(model: nn.Module, masks: ExpertMasks) -> None:
    """Set every masked expert weight to exactly zero."""
    for param, mask in iter_masked(model, masks):
        local_view(param).mul_(mask)


@torch.no_grad()
def mask_gradients(model: nn.Module, masks: ExpertMasks) -> None:
    for param, mask in iter_masked(model, masks):
        if param.grad is not None:
            local_view(param.grad).mul_(mask)


@torch.no_grad()
def mask_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, masks: ExpertMasks) -> int:
    """Zero the masked entries of every state tensor shaped like its parameter; returns how many
    state tensors were masked. Scalars (Adam's ``step``) and differently shaped state are left alone."""
    n = 0
    for param, mask in iter_masked(model, masks):
        state = optimizer.state.get(param)
        if not state:
            continue
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                local_view(value).mul_(mask)
                n += 1
    return n


def masks_from_zeros(model: nn.Module) -> ExpertMasks:
    """Keep-masks of a pruned model: every expert weight that is not exactly zero."""
    masks = ExpertMasks()
    for layer in moe_layers(model):
        for name in EXPERT_MATRICES:
            weight = getattr(layer.experts, name).detach()
            masks.set(layer.index, name, (weight.transpose(1, 2) if layer.adapter.transposed else weight) != 0)
    return masks


def measured_sparsity(model: nn.Module) -> float:
    """Zeros over the surviving experts' weight matrices, counted from the tensors."""
    total = zeros = 0
    for layer in moe_layers(model):
        for _, param, _ in _param_views(layer):
            total += param.numel()
            zeros += param.numel() - count_nonzero(param)
    return zeros / total if total else 0.0


__all__ = [
    "ExpertMasks",
    "apply_masks",
    "iter_masked",
    "mask_gradients",
    "mask_optimizer_state",
    "measured_sparsity",
    "pack_bits",
    "unpack_bits",
]
