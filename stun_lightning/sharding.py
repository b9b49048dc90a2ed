"""FSDP2 (``torch.distributed.fsdp.fully_shard``) as the rest of stun-lightning sees it: the one
module that knows about DTensors, so masks, reports and saving work the same on sharded and plain
models.

FSDP2 shards dim 0 of every parameter over the mesh (``torch.chunk`` rows, the last ranks' shards
shorter or empty when the size does not divide). For the fused expert tensors ``[E, out, in]`` (or
``[E, in, out]``) dim 0 is the expert axis. A rank only ever touches its local shard:

* :func:`local_view`: the local tensor of a parameter, its gradient or an optimizer state tensor
  (a view: writing into it writes the shard);
* :func:`local_mask`: the rows of a full mask that the rank's shard holds (no communication);
* :func:`full`: the whole tensor, gathered (a collective: every rank calls it, in the same order);
* :func:`count_nonzero`: zeros counted over all shards (a collective).

Building: :func:`shard_decoder_layers` applies ``fully_shard`` to every decoder layer, then the
root; :func:`materialize` gives a model built on the ``meta`` device real (sharded) storage.
:func:`gather_state_dict` gathers one tensor at a time, so the peak is one full tensor per rank.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

# NVLink SHARP / symmetric-memory multicast breaks on some hosts (device README); off for every
# process that may create NCCL communicators for FSDP2
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def set_nccl_env() -> None:
    """Set :data:`NCCL_ENV` unless the user chose otherwise (call before the process group starts)."""
    for key, value in NCCL_ENV.items():
        os.environ.setdefault(key, value)


def is_sharded(t: torch.Tensor | nn.Module) -> bool:
    """A DTensor, or a module with at least one DTensor parameter."""
    if isinstance(t, nn.Module):
        return any(isinstance(p, DTensor) for p in t.parameters())
    return isinstance(t, DTensor)


def local_view(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``t`` (``t`` itself when it is not sharded)."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_mask(mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The part of ``mask`` (shaped like ``param``'s global shape) that lies in this rank's shard,
    on the shard's device. Every rank slices its own copy: nothing is communicated, and only the
    shard's rows reach the accelerator."""
    if not isinstance(param, DTensor):
        return mask.to(param.device)
    local = param.to_local()
    if tuple(mask.shape) != tuple(param.shape):
        raise ValueError(f"mask of shape {tuple(mask.shape)} for a parameter of global shape {tuple(param.shape)}")
    if all(type(p) in (Shard, Replicate) for p in param.placements):
        # Shard's own rule (torch.chunk, trailing ranks short or empty), applied on the mask's device
        out, coordinate = mask, param.device_mesh.get_coordinate()
        for mesh_dim, placement in enumerate(param.placements):
            if isinstance(placement, Shard):
                chunks = torch.chunk(out, param.device_mesh.size(mesh_dim), dim=placement.dim)
                i = coordinate[mesh_dim]
                out = chunks[i] if i < len(chunks) else out.narrow(placement.dim, 0, 0)
        out = out.to(local.device)
    else:  # other placements (strided shards of FSDP + TP): DTensor's own slicing, src_data_rank=None: no broadcast
        out = distribute_tensor(
            mask.to(local.device), param.device_mesh, param.placements, src_data_rank=None
        ).to_local()
    if out.shape != local.shape:
        raise RuntimeError(f"local mask {tuple(out.shape)} does not match the local shard {tuple(local.shape)}")
    return out


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor; for a DTensor an all-gather every rank of its mesh must join."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def count_nonzero(t: torch.Tensor) -> int:
    """Nonzero entries of the whole tensor (summed over the sharded mesh dimensions)."""
    if t.is_meta:  # no values yet (a model built on meta before materialize): counted dense
        return t.numel()
    if not isinstance(t, DTensor):
        return int(torch.count_nonzero(t.detach()))
    n = torch.count_nonzero(t.to_local().detach()).reshape(1).to(torch.long)
    for dim, placement in enumerate(t.placements):
        if isinstance(placement, Shard):
            dist.all_reduce(n, group=t.device_mesh.get_group(dim))
    return int(n.item())


def no_split_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a transformers model (its ``_no_split_modules`` classes)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} names no decoder layer class in _no_split_modules, so there is nothing to shard "
            "per layer; pass layers= to shard_decoder_layers"
        )
    return layers


def shard_decoder_layers(
    model: nn.Module, mesh, *, layers: list[nn.Module] | None = None, reshard_after_forward: bool = True, mp_policy=None
) -> nn.Module:
    """``fully_shard`` every decoder layer of ``model`` over the 1-D ``mesh``, then the root (which
    takes the embeddings, final norm and head). Returns ``model``, sharded in place."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh.ndim != 1:
        raise ValueError(
            f"shard_decoder_layers needs a 1-D device mesh, got {mesh.ndim}-D {mesh}; pass the data-parallel sub-mesh (mesh['data_parallel'])"
        )
    kwargs = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for layer in layers if layers is not None else no_split_blocks(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    return model


def reshard(model: nn.Module) -> None:
    """Free the gathered parameters of an FSDP2 model after a forward with no backward (a frozen
    teacher): FSDP2 keeps the root's parameters unsharded after forward, waiting for a backward."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def has_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


@torch.no_grad()
def materialize(
    model: nn.Module, device: torch.device | str, init: Callable[[nn.Module], None] | None = None
) -> nn.Module:
    """Give a model built on ``torch.device("meta")`` (and sharded: each rank allocates only its shard)
    storage on ``device``, then initialise it with ``init(model)`` (default: transformers'
    ``init_weights``, which also recomputes non-persistent buffers such as rotary frequencies; a
    real run loads weights afterwards, e.g. with DCP). A no-op when nothing is on meta."""
    if not has_meta(model):
        return model
    model.to_empty(device=device)
    if init is not None:
        init(model)
    elif hasattr(model, "init_weights"):
        model.init_weights()  # transformers' own init, rotary buffers included
    else:
        raise ValueError(f"{type(model).__name__} has no init_weights(); pass init= to materialize")
    return model


def gather_state_dict(model: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The model's full state dict on CPU, gathered one tensor at a time (a collective for sharded
    tensors: every rank calls it). ``keep=False`` (ranks that do not save) gathers and drops."""
    out = {}
    for name, t in model.state_dict().items():
        t = full(t.detach())
        if keep:
            out[name] = t.cpu()
    return out


__all__ = [
    "NCCL_ENV",
    "count_nonzero",
    "no_split_blocks",
    "full",
    "gather_state_dict",
    "has_meta",
    "is_sharded",
    "local_mask",
    "local_view",
    "materialize",
    "reshard",
    "set_nccl_env",
    "shard_decoder_layers",
]
