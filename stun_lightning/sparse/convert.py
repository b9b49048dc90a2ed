"""``sparsify(model)``: one call turns a pruned model's experts into compressed form.

Each fused expert matrix gets the format its mask pays for (:class:`SparsifyConfig`): 2:4 when
every group of 4 inputs keeps at most 2, else the bitmap format (:mod:`.bitmap`) when it stores
the matrix in at most ``max_bytes_ratio`` of its dense bytes, else dense. A model whose matrices
are all 2:4 runs with ``stun_sparse24`` as below; any other mix runs with ``stun_bitmap``
(:mod:`.bitmap_experts`), which runs each matrix from its own format. :func:`sparse_formats`
reports the choice (also logged at INFO by ``sparsify``).

Each MoE block's experts module keeps its class (a subclass is swapped in) and its routing; its
fused ``gate_up_proj`` / ``down_proj`` parameters are replaced by buffers ``<name>_values`` and
``<name>_meta`` (:mod:`.format`), and ``config._experts_implementation`` becomes ``stun_sparse24``,
so ``model(...)`` and ``model.generate(...)`` run from the compressed weights. Experts removed by
STUN are already gone (surgery slices the tensors), so only survivors are compressed.

Reading ``experts.gate_up_proj`` on a compressed module still works, for inspection: it
decompresses the whole layer on every access (the forward never does).
"""

from __future__ import annotations

import logging
from typing import Iterator

import torch
from torch import nn

from ..adapters import MoEAdapter, decoder_layers, get_adapter
from ..surgery import sync_config
from . import bitmap_experts
from .bitmap import BITMAP, compress_bitmap
from .bitmap_experts import DENSE, SPARSE24, is_mixed
from .compressed_classes import (  # noqa: F401  (_dense_view, _mixed_view, _compressed_subclass: re-exported)
    _compressed_subclass,
    _dense_view,
    _mixed_view,
    _parts,
    mixed_class,
    sparse_class,
)
from .experts import IMPLEMENTATION, EXPERT_MATRICES, is_sparse24
from .format import compress_24
from .format_choice import SparsifyConfig, choose_format

logger = logging.getLogger("stun_lightning.sparse")


def expert_modules(model: nn.Module) -> Iterator[tuple[int, nn.Module, MoEAdapter]]:
    """(decoder-layer index, fused experts module, adapter) of every MoE block, dense or compressed.

    Unlike :func:`stun_lightning.moe_layers` this never touches a compressed module's dense view.
    """
    adapter = get_adapter(model)
    for i, layer in enumerate(decoder_layers(model)):
        experts = getattr(getattr(layer, "mlp", None), adapter.experts_attr, None)
        if experts is not None and (is_sparse24(experts) or is_mixed(experts) or "gate_up_proj" in experts._parameters):
            yield i, experts, adapter


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
    for key, t in list(experts._buffers.items()):
        if t is not None and key.startswith(EXPERT_MATRICES) and (not t.is_contiguous() or t.storage_offset() != 0):
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
        experts.register_buffer(
            f"{name}_meta", torch.empty(e, out, (inp // 4 + 1) // 2, dtype=torch.uint8, device=device)
        )
    return experts


def decompress_experts_(experts: nn.Module) -> nn.Module:
    """Inverse of :func:`compress_experts_`: dense parameters back, exactly."""
    return _decompress_(experts) if is_sparse24(experts) else experts


def _decompress_(experts: nn.Module) -> nn.Module:
    """A compressed experts module (2:4 or per-matrix formats) back to its transformers class, every
    matrix a dense parameter again, exactly."""
    formats = module_formats(experts)
    dense = {name: getattr(experts, name).contiguous() for name in EXPERT_MATRICES if name not in experts._parameters}
    for name in dense:
        for part in _parts(formats[name]):
            delattr(experts, f"{name}_{part}")
    for attr in ("_stun_formats", "_stun_in_features", "_stun_num_experts", "_stun_dtype"):
        experts.__dict__.pop(attr, None)
    experts.__class__ = type(experts)._stun_dense_class
    for name, w in dense.items():
        setattr(experts, name, nn.Parameter(w, requires_grad=False))
    return experts


# ---- per-matrix formats (stun_bitmap) ----------------------------------------------------------


def _set_mixed_attrs(
    experts: nn.Module, formats: dict[str, str], in_features: dict[str, int], num_experts: int, dtype: torch.dtype
) -> None:
    experts.__class__ = mixed_class(type(experts))
    experts._stun_formats = dict(formats)
    experts._stun_in_features = dict(in_features)
    experts._stun_num_experts = int(num_experts)
    experts._stun_dtype = dtype


def compress_mixed_(experts: nn.Module, formats: dict[str, str]) -> nn.Module:
    """Store each matrix of one experts module in ``formats[name]``, in place (for ``stun_bitmap``)."""
    if is_mixed(experts):
        return experts
    weights = {name: _matrix(experts, name) for name in EXPERT_MATRICES}
    packed = {}
    for name, w in weights.items():
        if formats[name] == BITMAP:
            packed[name] = dict(zip(_parts(BITMAP), compress_bitmap(w)))
        elif formats[name] == SPARSE24:
            packed[name] = dict(zip(_parts(SPARSE24), compress_24(w, name)))
    e, _, _ = weights["gate_up_proj"].shape
    in_features = {name: w.shape[-1] for name, w in weights.items()}
    dtype = weights["gate_up_proj"].dtype
    for name in packed:
        delattr(experts, name)
    _set_mixed_attrs(experts, formats, in_features, e, dtype)
    for name, parts in packed.items():
        for part, t in parts.items():
            experts.register_buffer(f"{name}_{part}", t)
    return own_buffers_(experts)


def empty_mixed_experts_(
    experts: nn.Module, formats: dict[str, str], shapes: dict[str, tuple[int, ...]], dtypes: dict[str, torch.dtype]
) -> nn.Module:
    """Give a dense experts module ``stun_bitmap`` buffers of the saved ``shapes``, uninitialised (for loading)."""
    weights = {name: _matrix(experts, name) for name in EXPERT_MATRICES}
    device = experts.gate_up_proj.device
    in_features = {name: w.shape[-1] for name, w in weights.items()}
    for name in EXPERT_MATRICES:
        if formats[name] != DENSE:
            delattr(experts, name)
    _set_mixed_attrs(
        experts,
        formats,
        in_features,
        weights["gate_up_proj"].shape[0],
        dtypes.get("dtype", weights["gate_up_proj"].dtype),
    )
    for name in EXPERT_MATRICES:
        for part in _parts(formats[name]):
            key = f"{name}_{part}"
            experts.register_buffer(key, torch.empty(shapes[key], dtype=dtypes[key], device=device))
    return experts


def decompress_mixed_(experts: nn.Module) -> nn.Module:
    """Inverse of :func:`compress_mixed_`: dense parameters back, exactly."""
    return _decompress_(experts) if is_mixed(experts) else experts


def module_formats(experts: nn.Module) -> dict[str, str]:
    """``{matrix: "2:4" | "bitmap" | "dense"}``: how one experts module stores its matrices now."""
    if is_mixed(experts):
        return dict(experts._stun_formats)
    return {name: SPARSE24 if is_sparse24(experts) else DENSE for name in EXPERT_MATRICES}


def sparse_formats(model: nn.Module) -> dict[int, dict[str, str]]:
    """``{layer: {matrix: format}}``: how every MoE layer stores its expert matrices now."""
    return {index: module_formats(experts) for index, experts, _ in expert_modules(model)}


def _set_implementation(model: nn.Module, implementation: str | None) -> None:
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(implementation)
    else:
        model.config._experts_implementation = implementation


def plan_formats(model: nn.Module, config: SparsifyConfig | None = None) -> dict[int, dict[str, str]]:
    """What :func:`sparsify` would store each dense expert matrix as, without converting anything."""
    config = config or SparsifyConfig()
    plan = {}
    with torch.no_grad():
        for index, experts, _ in expert_modules(model):
            if is_sparse24(experts) or is_mixed(experts):
                plan[index] = module_formats(experts)
            else:
                plan[index] = {
                    name: choose_format(_matrix(experts, name), config, f"layer {index} {name}")
                    for name in EXPERT_MATRICES
                }
    return plan


def _describe(plan: dict[int, dict[str, str]]) -> str:
    counts: dict[str, int] = {}
    for formats in plan.values():
        for fmt in formats.values():
            counts[fmt] = counts.get(fmt, 0) + 1
    return ", ".join(f"{n} {fmt}" for fmt, n in sorted(counts.items()))


def sparsify(model: nn.Module, config: SparsifyConfig | None = None) -> nn.Module:
    """Compress every MoE layer's expert matrices to the storage their masks pay for, in place.

    Per matrix (:class:`SparsifyConfig`): 2:4, bitmap or dense. All 2:4: the model runs with
    ``stun_sparse24``; any other mix with ``stun_bitmap``; all dense: nothing changes. Every matrix
    is checked before any is converted, so a refusal leaves the model unchanged. The choice is
    logged at INFO (logger ``stun_lightning.sparse``) and given by :func:`sparse_formats`. Returns the model.
    """
    blocks = list(expert_modules(model))
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no MoE experts to compress")
    if is_sparsified(model):
        return model
    if any(is_sparse24(experts) or is_mixed(experts) for _, experts, _ in blocks):
        densify(model)  # a partly converted model: start again from the dense weights
        blocks = list(expert_modules(model))
    plan = plan_formats(model, config)
    logger.info("sparsify: %s", _describe(plan))
    for index, formats in plan.items():
        logger.info("sparsify: layer %d %s", index, ", ".join(f"{name} {fmt}" for name, fmt in formats.items()))
    chosen = {fmt for formats in plan.values() for fmt in formats.values()}
    if chosen == {DENSE}:
        return model
    sync_config(model)  # counts into the config while the dense views are still cheap
    previous = model.config._experts_implementation
    implementation = IMPLEMENTATION if chosen == {SPARSE24} else bitmap_experts.IMPLEMENTATION
    with torch.no_grad():
        for index, experts, _ in blocks:
            if implementation == IMPLEMENTATION:
                compress_experts_(experts, f"layer {index}")
            else:
                compress_mixed_(experts, plan[index])
    if previous not in (IMPLEMENTATION, bitmap_experts.IMPLEMENTATION):
        model._stun_dense_experts_implementation = previous
    _set_implementation(model, implementation)
    return model


def densify(model: nn.Module, implementation: str | None = None) -> nn.Module:
    """Undo :func:`sparsify` in place: dense expert parameters (with their zeros) and the experts
    implementation used before (or ``implementation``)."""
    with torch.no_grad():
        for _, experts, _ in expert_modules(model):
            decompress_experts_(experts)
            decompress_mixed_(experts)
    implementation = implementation or getattr(model, "_stun_dense_experts_implementation", None)
    if model.config._experts_implementation in (IMPLEMENTATION, bitmap_experts.IMPLEMENTATION):
        _set_implementation(model, implementation)  # None: transformers' default
    return model


def is_sparsified(model: nn.Module) -> bool:
    """True when every MoE layer of ``model`` holds converted experts (2:4, or per-matrix formats)."""
    blocks = list(expert_modules(model))
    return bool(blocks) and (
        all(is_sparse24(experts) for _, experts, _ in blocks) or all(is_mixed(experts) for _, experts, _ in blocks)
    )


def sparse_nbytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the routed experts' weights as stored now, and as dense storage would hold them."""
    stored = dense = 0
    for _, experts, _ in expert_modules(model):
        for name in EXPERT_MATRICES:
            if name in experts._parameters:
                w = experts._parameters[name]
                stored += w.numel() * w.element_size()
                dense += w.numel() * w.element_size()
                continue
            values = getattr(experts, f"{name}_values")
            fmt = experts._stun_formats[name] if is_mixed(experts) else SPARSE24
            for part in _parts(fmt):
                t = getattr(experts, f"{name}_{part}")
                stored += t.numel() * t.element_size()
            if fmt == BITMAP:
                e, n, _ = getattr(experts, f"{name}_bitmap").shape
                dense += e * n * experts._stun_in_features[name] * values.element_size()
            else:
                dense += values.numel() * 2 * values.element_size()
    return {"expert_bytes": stored, "expert_bytes_dense": dense}
