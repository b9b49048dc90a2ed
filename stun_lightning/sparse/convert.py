"""``sparsify(model)``: one call turns a 2:4-pruned model's experts into compressed form.

Each MoE block's experts module keeps its class (a subclass is swapped in) and its routing; its
fused ``gate_up_proj`` / ``down_proj`` parameters are replaced by buffers ``<name>_values`` and
``<name>_meta`` (:mod:`.format`), and ``config._experts_implementation`` becomes ``stun_sparse24``,
so ``model(...)`` and ``model.generate(...)`` run from the compressed weights. Experts removed by
STUN are already gone (surgery slices the tensors), so only survivors are compressed.

Reading ``experts.gate_up_proj`` on a compressed module still works, for inspection: it
decompresses the whole layer on every access (the forward never does).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterator

import torch
from torch import nn

from ..adapters import MoEAdapter, decoder_layers, get_adapter
from ..surgery import sync_config
from .experts import IMPLEMENTATION, EXPERT_MATRICES, is_sparse24
from .format import check_24, compress_24, decompress_24


def expert_modules(model: nn.Module) -> Iterator[tuple[int, nn.Module, MoEAdapter]]:
    """(decoder-layer index, fused experts module, adapter) of every MoE block, dense or compressed.

    Unlike :func:`stun_lightning.moe_layers` this never touches a compressed module's dense view.
    """
    adapter = get_adapter(model)
    for i, layer in enumerate(decoder_layers(model)):
        experts = getattr(getattr(layer, "mlp", None), adapter.experts_attr, None)
        if experts is not None and (is_sparse24(experts) or "gate_up_proj" in experts._parameters):
            yield i, experts, adapter


def _dense_view(name: str):
    def getter(self) -> torch.Tensor:
        dense = decompress_24(getattr(self, f"{name}_values"), getattr(self, f"{name}_meta"))
        return dense.transpose(1, 2) if self.is_transposed else dense

    return property(getter, doc=f"Dense ``{name}`` decompressed on each access (inspection only; the forward never builds it).")


@lru_cache(maxsize=None)
def sparse_class(dense_class: type) -> type:
    """The compressed counterpart of a transformers experts class (a cached subclass)."""
    attrs = {name: _dense_view(name) for name in EXPERT_MATRICES}
    attrs.update(_stun_sparse24=True, _stun_dense_class=dense_class, __module__=dense_class.__module__)
    return type(f"Sparse24{dense_class.__name__}", (dense_class,), attrs)


def _matrix(experts: nn.Module, name: str) -> torch.Tensor:
    """Weight ``name`` as ``[E, out, in]`` (GPT-OSS stores ``[E, in, out]``)."""
    w = getattr(experts, name)
    return w.transpose(1, 2) if experts.is_transposed else w


def own_buffers_(experts: nn.Module) -> nn.Module:
    """Give each compressed buffer its own contiguous storage from offset 0, in place (a copy only
    for one that is a view, e.g. into a checkpoint's storage). The kernels load 8 values or 8
    metadata bytes at a time from the start of a buffer; this is the one place where that layout
    is established (sparsify, load), so the compiled forward need not look at storage offsets, and
    a misaligned view is not copied on every call by the kernels' launchers."""
    for name in EXPERT_MATRICES:
        for part in ("values", "meta"):
            key = f"{name}_{part}"
            t = experts._buffers[key]
            if not t.is_contiguous() or t.storage_offset() != 0:
                experts._buffers[key] = t.contiguous().clone()
    return experts


def compress_experts_(experts: nn.Module, label: str = "experts") -> nn.Module:
    """Replace one experts module's fused weights by their 2:4 compressed form, in place."""
    if is_sparse24(experts):
        return experts
    packed = {name: compress_24(_matrix(experts, name), f"{label} {name}") for name in EXPERT_MATRICES}
    for name in EXPERT_MATRICES:
        delattr(experts, name)
    experts.__class__ = sparse_class(type(experts))
    for name, (values, meta) in packed.items():
        experts.register_buffer(f"{name}_values", values)
        experts.register_buffer(f"{name}_meta", meta)
    return own_buffers_(experts)


def empty_sparse_experts_(experts: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Give a dense experts module compressed buffers of the right shapes, uninitialised (for loading)."""
    shapes = {name: _matrix(experts, name).shape for name in EXPERT_MATRICES}
    device = experts.gate_up_proj.device
    dtype = dtype or experts.gate_up_proj.dtype
    for name in EXPERT_MATRICES:
        delattr(experts, name)
    experts.__class__ = sparse_class(type(experts))
    for name, (e, out, inp) in shapes.items():
        experts.register_buffer(f"{name}_values", torch.empty(e, out, inp // 2, dtype=dtype, device=device))
        experts.register_buffer(f"{name}_meta", torch.empty(e, out, (inp // 4 + 1) // 2, dtype=torch.uint8, device=device))
    return experts


def decompress_experts_(experts: nn.Module) -> nn.Module:
    """Inverse of :func:`compress_experts_`: dense parameters back, exactly."""
    if not is_sparse24(experts):
        return experts
    dense = {name: getattr(experts, name).contiguous() for name in EXPERT_MATRICES}
    for name in EXPERT_MATRICES:
        delattr(experts, f"{name}_values")
        delattr(experts, f"{name}_meta")
    experts.__class__ = type(experts)._stun_dense_class
    for name, w in dense.items():
        setattr(experts, name, nn.Parameter(w, requires_grad=False))
    return experts


def _set_implementation(model: nn.Module, implementation: str | None) -> None:
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(implementation)
    else:
        model.config._experts_implementation = implementation


def sparsify(model: nn.Module) -> nn.Module:
    """Compress every MoE layer's experts to 2:4 form and run them with ``stun_sparse24``, in place.

    Every expert matrix is checked before any is converted, so a refusal
    (:class:`~stun_lightning.sparse.format.Not24SparseError`, naming the layer and ``pattern: "2:4"``)
    leaves the model unchanged. Returns the model.
    """
    blocks = list(expert_modules(model))
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no MoE experts to compress")
    if any(not is_sparse24(experts) for _, experts, _ in blocks):
        sync_config(model)  # counts into the config while the dense views are still cheap
    for index, experts, _ in blocks:
        if not is_sparse24(experts):
            for name in EXPERT_MATRICES:
                check_24(_matrix(experts, name), f"layer {index} {name}")
    previous = model.config._experts_implementation
    with torch.no_grad():
        for index, experts, _ in blocks:
            compress_experts_(experts, f"layer {index}")
    if previous != IMPLEMENTATION:
        model._stun_dense_experts_implementation = previous
    _set_implementation(model, IMPLEMENTATION)
    return model


def densify(model: nn.Module, implementation: str | None = None) -> nn.Module:
    """Undo :func:`sparsify` in place: dense expert parameters (with their zeros) and the experts
    implementation used before (or ``implementation``)."""
    with torch.no_grad():
        for _, experts, _ in expert_modules(model):
            decompress_experts_(experts)
    implementation = implementation or getattr(model, "_stun_dense_experts_implementation", None)
    if model.config._experts_implementation == IMPLEMENTATION:
        _set_implementation(model, implementation)  # None: transformers' default
    return model


def is_sparsified(model: nn.Module) -> bool:
    """True when every MoE layer of ``model`` holds compressed experts."""
    blocks = list(expert_modules(model))
    return bool(blocks) and all(is_sparse24(experts) for _, experts, _ in blocks)


def sparse_nbytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the routed experts' weights as stored now, and as dense storage would hold them."""
    stored = dense = 0
    for _, experts, _ in expert_modules(model):
        for name in EXPERT_MATRICES:
            if is_sparse24(experts):
                values, meta = getattr(experts, f"{name}_values"), getattr(experts, f"{name}_meta")
                stored += values.numel() * values.element_size() + meta.numel()
                dense += values.numel() * 2 * values.element_size()
            else:
                w = getattr(experts, name)
                stored += w.numel() * w.element_size()
                dense += w.numel() * w.element_size()
    return {"expert_bytes": stored, "expert_bytes_dense": dense}
