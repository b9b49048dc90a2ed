"""The ``stun_bitmap`` experts implementation: each fused expert matrix runs from its own format.

:func:`stun_lightning.sparse.sparsify` picks, per matrix, dense, 2:4 (:mod:`.format`) or bitmap
(:mod:`.bitmap`) storage; when some matrix is not 2:4 the model runs with
``config._experts_implementation = "stun_bitmap"``, registered in transformers' ``ExpertsInterface``
on import. The module's ``_stun_formats`` (fixed at sparsify time) says which op runs each
matrix, so the traced forward has no branch on tensor metadata:

* every matrix shares one routing, ``stun::route_pairs`` (:mod:`.experts`: pairs sorted by expert
  in blocks of ``block_m`` rows, static shapes);
* ``"2:4"``: ``stun::sparse24_experts_mm`` (the 2:4 kernels);
* ``"bitmap"``: ``stun::bitmap_experts_mm``: on CUDA, while experts see at most 16 pairs each
  (decode), the Triton kernel of :mod:`.triton_bitmap` reads bitmap words and packed values for
  the routed experts only; otherwise (prefill, CPU) the weights are expanded to dense and run by
  transformers' ``grouped_mm`` over the same routing;
* ``"dense"``: ``stun::dense_experts_mm``, that ``grouped_mm`` on the kept dense weight.

All three are opaque to ``torch.compile`` with fake kernels giving their shapes.
"""

from __future__ import annotations

import torch
from transformers.integrations.moe import ExpertsInterface, _grouped_mm

from .bitmap import decompress_bitmap
from .experts import EXPERT_MATRICES, _finish, _opaque_op, pairs_layout, route_pairs, sparse24_experts_mm

#: the name to put in ``config._experts_implementation``
IMPLEMENTATION = "stun_bitmap"
DENSE, SPARSE24, BITMAP = "dense", "2:4", "bitmap"
#: pairs per routed expert up to which CUDA runs the bitmap decode kernel (the 16-row blocks of
#: :func:`.experts.block_m_for`); above, weights are expanded to dense for the tensor cores
DECODE_MAX_BLOCK_M = 16


def is_mixed(experts: torch.nn.Module) -> bool:
    """True for an experts module converted for ``stun_bitmap`` (whatever its matrices' formats)."""
    return bool(getattr(type(experts), "_stun_mixed", False))


def grouped_dense(
    a: torch.Tensor,
    weight: torch.Tensor,
    sorted_ids: torch.Tensor,
    block_expert: torch.Tensor,
    rows_per_a: int,
    block_m: int,
) -> torch.Tensor:
    """``out[s] = a[s // rows_per_a] @ weight[expert(s)].T`` for the layout of :func:`.experts.align_pairs`
    (``weight`` ``[E, N, K]``), by transformers' ``grouped_mm``: rows in sorted order, each expert's
    padded run one group (padding rows are zero; rows of the unused tail blocks are ignored and land on the sentinel)."""
    n_pairs = a.shape[0] * rows_per_a
    num_experts = weight.shape[0]
    ids = sorted_ids.long()
    valid = ids < n_pairs
    rows = a[ids.clamp(max=n_pairs - 1) // rows_per_a] * valid.unsqueeze(-1).to(a.dtype)
    # blocks per expert; histc (not bincount of a boolean selection) has a static size: no host sync, so
    # CUDA graphs can capture it. The unused tail blocks' -1 falls outside [0, E - 1] and is not counted.
    blocks = torch.histc(block_expert.float(), bins=num_experts, min=0, max=num_experts - 1).to(torch.int64)
    offs = (blocks.cumsum(0) * block_m).to(torch.int32)
    rows, b = rows.to(weight.dtype), weight.transpose(1, 2)
    if (weight.shape[1] * weight.element_size()) % 16 or (weight.shape[2] * weight.element_size()) % 16:
        out = torch.ops.transformers.grouped_mm_fallback(rows, b, offs=offs)  # grouped_mm needs 16-byte strides
    else:
        out = _grouped_mm(rows, b, offs)
    result = out.new_empty(n_pairs + 1, weight.shape[1])
    result[torch.where(valid, ids, n_pairs)] = out
    return result[:n_pairs]


def _layout(a, num_experts, sorted_ids, block_expert, rows_per_a):
    n_pairs = a.shape[0] * rows_per_a
    block_m, n_blocks = pairs_layout(n_pairs, num_experts)
    return block_m, sorted_ids[: n_blocks * block_m], block_expert[:n_blocks]


@_opaque_op
def bitmap_experts_mm(
    a: torch.Tensor,
    bitmap: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    sorted_ids: torch.Tensor,
    block_expert: torch.Tensor,
    rows_per_a: int,
    in_features: int,
) -> torch.Tensor:
    """``out[s] = a[s // rows_per_a] @ W[expert(s)].T``, ``W`` stored as a bitmap (:mod:`.bitmap`), on
    the layout of :func:`.experts.route_pairs`: ``[M * rows_per_a, N]``."""
    if a.shape[0] * rows_per_a == 0:
        return a.new_empty(0, bitmap.shape[1])
    block_m, ids, blocks = _layout(a, bitmap.shape[0], sorted_ids, block_expert, rows_per_a)
    if a.is_cuda and block_m <= DECODE_MAX_BLOCK_M:
        from .triton_bitmap import fits, launch_bitmap_decode

        if fits(a, values):
            return launch_bitmap_decode(a, bitmap, values, offsets, ids, blocks, rows_per_a, block_m, in_features)
    dense = decompress_bitmap(bitmap, values, offsets, in_features)
    return grouped_dense(a, dense, ids, blocks, rows_per_a, block_m).to(a.dtype)


@torch.library.register_fake("stun::bitmap_experts_mm")
def _(a, bitmap, values, offsets, sorted_ids, block_expert, rows_per_a, in_features):
    return a.new_empty(a.shape[0] * rows_per_a, bitmap.shape[1])


@_opaque_op
def dense_experts_mm(
    a: torch.Tensor, weight: torch.Tensor, sorted_ids: torch.Tensor, block_expert: torch.Tensor, rows_per_a: int
) -> torch.Tensor:
    """:func:`bitmap_experts_mm` for a dense ``weight`` ``[E, N, K]`` (a matrix the format would not pay for)."""
    if a.shape[0] * rows_per_a == 0:
        return a.new_empty(0, weight.shape[1])
    block_m, ids, blocks = _layout(a, weight.shape[0], sorted_ids, block_expert, rows_per_a)
    return grouped_dense(a, weight, ids, blocks, rows_per_a, block_m).to(a.dtype)


@torch.library.register_fake("stun::dense_experts_mm")
def _(a, weight, sorted_ids, block_expert, rows_per_a):
    return a.new_empty(a.shape[0] * rows_per_a, weight.shape[1])


def dense_matrix(experts: torch.nn.Module, name: str) -> torch.Tensor:
    """A dense matrix kept by a ``stun_bitmap`` module as ``[E, out, in]`` (GPT-OSS stores ``[E, in, out]``)."""
    w = experts._parameters[name]
    return w.transpose(1, 2) if experts.is_transposed else w


def _matmul(self, name: str, a: torch.Tensor, sorted_ids, block_expert, rows_per_a: int) -> torch.Tensor:
    fmt = self._stun_formats[name]
    if fmt == BITMAP:
        return bitmap_experts_mm(
            a,
            getattr(self, f"{name}_bitmap"),
            getattr(self, f"{name}_values"),
            getattr(self, f"{name}_offsets"),
            sorted_ids,
            block_expert,
            rows_per_a,
            self._stun_in_features[name],
        )
    if fmt == SPARSE24:
        return sparse24_experts_mm(
            a, getattr(self, f"{name}_values"), getattr(self, f"{name}_meta"), sorted_ids, block_expert, rows_per_a
        )
    return dense_experts_mm(a, dense_matrix(self, name), sorted_ids, block_expert, rows_per_a)


def bitmap_experts_forward(
    self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """``ExpertsInterface`` entry: ``hidden_states [T, H]``, ``top_k_index/weights [T, k]`` -> ``[T, H]``."""
    if not is_mixed(self):
        from .experts import NotSparseExpertsError

        raise NotSparseExpertsError(
            f"{type(self).__name__} is not converted for {IMPLEMENTATION!r}; convert the model with "
            "stun_lightning.sparse.sparsify(model), or load a compressed export with stun_lightning.export.load_exported(path)"
        )
    num_tokens, hidden = hidden_states.shape
    top_k = top_k_index.shape[-1]
    sorted_ids, block_expert = route_pairs(top_k_index, self._stun_num_experts)
    flat = top_k_index.reshape(-1)
    x = hidden_states.to(self._stun_dtype)
    gate_up = _matmul(self, "gate_up_proj", x, sorted_ids, block_expert, top_k)
    if getattr(self, "has_bias", False):
        gate_up = gate_up + self.gate_up_proj_bias[flat]
    h = self._apply_gate(gate_up)
    out = _matmul(self, "down_proj", h, sorted_ids, block_expert, 1)
    if getattr(self, "has_bias", False):
        out = out + self.down_proj_bias[flat]
    out = _finish(self, out)
    out = out.float() * top_k_weights.reshape(-1, 1).float()
    return out.view(num_tokens, top_k, hidden).sum(dim=1).to(hidden_states.dtype)


ExpertsInterface.register(IMPLEMENTATION, bitmap_experts_forward)

__all__ = ["BITMAP", "DENSE", "IMPLEMENTATION", "EXPERT_MATRICES", "SPARSE24", "bitmap_experts_forward", "is_mixed"]
