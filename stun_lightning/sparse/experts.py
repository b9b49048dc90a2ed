"""The ``stun_sparse24`` experts implementation: fused experts run from compressed 2:4 weights.

Registered in transformers' ``ExpertsInterface`` on import, so any model whose experts class uses
``@use_experts_implementation`` runs it once ``config._experts_implementation = "stun_sparse24"``
(:func:`stun_lightning.sparse.sparsify` sets it). Two paths compute the same function:

* grouped (CUDA, and whenever torch.compile / torch.export traces): the (token, expert) pairs are
  sorted by expert and padded to blocks of ``block_m`` rows with static shapes (as vLLM's
  ``moe_align_block_size``, so CUDA graphs and compile see no data-dependent shape; one Triton
  launch on CUDA, :mod:`.triton_align`, torch ops otherwise), then
  gate_up and down run for the routed experts only, reading compressed values + metadata
  (:func:`sparse24_dispatch_mm`): on the sparse tensor cores (:mod:`.cuda_mma`)
  ``stun::sparse24_mma`` while experts see 2-16 tokens (or from 32 pairs per call) and
  ``stun::sparse24_mma_tile`` for prefill (sparse ``wgmma`` from 128 pairs per routed expert on a
  Hopper GPU, ``mma.sp`` from 256 elsewhere); otherwise
  ``stun::sparse24_grouped_mm``, whose body on CUDA is a Triton kernel (:mod:`.triton_kernel`).
* reference (eager CPU): decompress the weights of each expert that some token selected and run
  it as transformers' eager loop does; nothing dense is kept between calls.

Which kernel runs, and ``block_m``, depend on the number of pairs, which is the token count
(dynamic under ``torch.compile(dynamic=True)`` or after a batch-size change) and which the kernels'
checks read off the tensors (dtype, contiguity, storage offset). So the grouped path reaches the
compiled graph as two opaque ops whose fake kernels give their shapes with no branch
(:func:`route_pairs`, :func:`sparse24_experts_mm`): every choice is made inside them on concrete
sizes when they run (or when a CUDA graph records them), and the traced forward has no Python
control flow on tensor metadata and no graph break, whatever the shapes. Only the export for
AOTInductor (packages hold no Python op: :func:`tracing_for_aoti`) traces into the Triton ops instead (static shapes).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from transformers.integrations.moe import ExpertsInterface

from ..adapters import EXPERT_MATRICES  # noqa: F401  (stored compressed; biases stay dense; bitmap_experts imports it from here)
from .format import decompress_24

#: the name to put in ``config._experts_implementation``
IMPLEMENTATION = "stun_sparse24"
#: pairs per call from which decode runs the sparse tensor-core kernel even at one token per
#: routed expert (see :func:`sparse24_dispatch_mm`)
MMA_MIN_PAIRS = 32


class NotSparseExpertsError(RuntimeError):
    """``stun_sparse24`` was selected for experts that still hold dense weights."""


def is_sparse24(experts: torch.nn.Module) -> bool:
    return bool(getattr(type(experts), "_stun_sparse24", False))


#: the rows per block that :func:`block_m_for` gives, smallest to largest
BLOCK_MS = (16, 64, 128)


def block_m_for(num_pairs: int, num_experts: int) -> int:
    """Rows per block: 16 (the smallest tensor-core tile) while experts see few tokens, 64 up to 128
    tokens per expert, then 128 (faster at 2048-token prefill on an H100: sparse_kernels_h100.md)."""
    per_expert = num_pairs / max(1, min(num_experts, num_pairs))
    return 16 if per_expert <= 16 else 64 if per_expert < 128 else 128


def pairs_layout(num_pairs: int, num_experts: int) -> tuple[int, int]:
    """``(block_m, n_blocks)`` of :func:`align_pairs` for a call of ``num_pairs`` pairs (concrete ints)."""
    block_m = block_m_for(num_pairs, num_experts)
    return block_m, -(-num_pairs // block_m) + min(num_experts, num_pairs)


def layout_bound(num_pairs, num_experts: int):
    """``(len(sorted_ids), len(block_expert))`` that hold the layout of :func:`pairs_layout` for any
    ``block_m`` of :data:`BLOCK_MS`: one expression of ``num_pairs`` with no branch, so a symbolic
    token count gives a symbolic shape and no guard. ``n_blocks * block_m < num_pairs + block_m +
    touched * block_m``, largest at the largest ``block_m``; ``n_blocks`` is largest at the smallest."""
    touched = torch.sym_min(num_experts, num_pairs)
    small, large = BLOCK_MS[0], BLOCK_MS[-1]
    return num_pairs + large - 1 + large * touched, (num_pairs + small - 1) // small + touched


def align_pairs(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group (token, expert) pairs by expert in blocks of ``block_m`` rows, with static shapes.

    Pair ``s = token * top_k + j`` selects expert ``top_k_index.view(-1)[s]``. Returns
    ``sorted_ids`` ``[n_blocks * block_m]`` (pair ids, each expert's run padded to whole blocks with
    the sentinel ``S`` = number of pairs) and ``block_expert`` ``[n_blocks]`` (each block's expert,
    -1 for the unused tail). ``n_blocks = ceil(S / block_m) + min(E, S)`` bounds any routing.
    """
    flat = top_k_index.reshape(-1)
    n_pairs = flat.numel()
    device = flat.device
    sorted_experts, perm = torch.sort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=device).scatter_add_(
        0, flat.long(), torch.ones_like(flat, dtype=torch.long)
    )
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    padded_start = padded_end - padded
    count_start = counts.cumsum(0) - counts
    rank = torch.arange(n_pairs, device=device) - count_start[sorted_experts]
    position = padded_start[sorted_experts] + rank
    n_blocks = -(-n_pairs // block_m) + min(num_experts, n_pairs)
    sorted_ids = torch.full((n_blocks * block_m,), n_pairs, dtype=torch.int32, device=device)
    sorted_ids = sorted_ids.scatter(0, position, perm.to(torch.int32))
    starts = torch.arange(n_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_end, starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_ids, block_expert


def _align_pairs_fused(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`align_pairs` in one Triton launch (:mod:`.triton_align`; CUDA)."""
    from .triton_align import launch_align

    return launch_align(top_k_index.reshape(-1), num_experts, block_m, wrap=True)


def align(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`align_pairs`: in one Triton launch on CUDA (:mod:`.triton_align`), else by torch ops."""
    if top_k_index.is_cuda and top_k_index.numel() > 0:
        return align_pairs_fused(top_k_index, num_experts, block_m)
    return align_pairs(top_k_index, num_experts, block_m)


def grouped_mm_reference(a, values, meta, sorted_ids, block_expert, rows_per_a: int, block_m: int) -> torch.Tensor:
    """What ``stun::sparse24_grouped_mm`` computes, in plain torch (static shapes, for CPU tracing)."""
    n_pairs = a.shape[0] * rows_per_a
    n_blocks = block_expert.numel()
    experts = block_expert.clamp(min=0).long()
    weights = decompress_24(values[experts], meta[experts])  # [n_blocks, N, K]
    ids = sorted_ids.view(n_blocks, block_m).long()
    valid = ids < n_pairs
    rows = a[(ids.clamp(max=n_pairs - 1) // rows_per_a)] * valid.unsqueeze(-1).to(a.dtype)
    out = torch.bmm(rows, weights.transpose(1, 2))  # [n_blocks, block_m, N]
    target = torch.where(valid, ids, n_pairs).view(-1)
    result = a.new_zeros(n_pairs + 1, values.shape[1])
    result = result.index_put((target,), out.reshape(-1, values.shape[1]))
    return result[:n_pairs]


def _sparse24_grouped_mm(
    a: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    sorted_ids: torch.Tensor,
    block_expert: torch.Tensor,
    rows_per_a: int,
    block_m: int,
) -> torch.Tensor:
    """``out[s] = a[s // rows_per_a] @ W[expert(s)].T`` for every pair ``s``, W stored 2:4.

    ``a`` ``[M, K]``; ``values`` ``[E, N, K/2]``, ``meta`` ``[E, N, ceil(K/8)]`` (:mod:`.format`);
    ``sorted_ids`` / ``block_expert`` from :func:`align_pairs`. Returns ``[M * rows_per_a, N]``.
    """
    if a.device.type == "cuda":
        from .triton_kernel import launch_grouped_mm

        return launch_grouped_mm(a, values, meta, sorted_ids, block_expert, rows_per_a, block_m, wrap=True)
    return grouped_mm_reference(a, values, meta, sorted_ids, block_expert, rows_per_a, block_m)


def _register_op(name: str, fn):
    # torch logs a warning when it cannot import triton to look for kernels (CPU-only installs)
    log = logging.getLogger("torch._library.triton")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return torch.library.triton_op(name, mutates_args=())(fn)
    finally:
        log.setLevel(level)


sparse24_grouped_mm = _register_op("stun::sparse24_grouped_mm", _sparse24_grouped_mm)
align_pairs_fused = _register_op("stun::align_pairs", _align_pairs_fused)


def sparse24_dispatch_mm(a, values, meta, sorted_ids, block_expert, rows_per_a: int, block_m: int) -> torch.Tensor:
    """On the sparse tensor cores (:mod:`.cuda_mma`) where a kernel fits: ``stun::sparse24_mma_tile``
    for prefill blocks, ``stun::sparse24_mma`` while experts see 2-16 tokens; else
    ``stun::sparse24_grouped_mm`` (Triton on CUDA, torch ops on the CPU).

    Its checks read the tensors' sizes, dtypes and storage: it runs inside
    :func:`sparse24_experts_mm` on concrete tensors, and is traced only for AOTInductor (:func:`tracing_for_aoti`)."""
    from . import cuda_mma

    if cuda_mma.fits_tile(a, values, meta, block_m, rows_per_a):
        return cuda_mma.sparse24_mma_tile(a, values, meta, sorted_ids, block_expert, rows_per_a)
    if cuda_mma.fits(a, values, meta, block_m):
        from .triton_kernel import rows_bucket_for, uses_decode_kernel

        # one token per routed expert on a few experts: the CUDA-core decode kernel streams the
        # weights faster (Mixtral gate_up at 1 token, 117.5 vs 127.8 us); with many routed experts
        # (Qwen3 at 8 tokens: 64 pairs) the mma kernel is as fast or faster (gate_up 96.4 vs 97.9 us,
        # down 49.5 vs 53.8 us): benchmarks/results/sparse_kernels_h100.md
        n_pairs = a.shape[0] * rows_per_a
        if n_pairs >= MMA_MIN_PAIRS or not uses_decode_kernel(
            values, rows_bucket_for(n_pairs, values.shape[0]), block_m
        ):
            return cuda_mma.mma_sp_grouped_mm(a, values, meta, sorted_ids, block_expert, rows_per_a)
    return sparse24_grouped_mm(a, values, meta, sorted_ids, block_expert, rows_per_a, block_m)


_LIBRARY = torch.library.Library("stun", "FRAGMENT")


def _opaque_op(fn):
    """``fn`` as ``torch.ops.stun.<name>`` for every device, opaque to torch.compile (its fake kernel
    registered next to it), without ``torch.library.custom_op``'s wrappers (their CPU cost per call:
    :func:`.cuda_mma._cuda_op`). No autograd formula: these ops serve inference."""
    name = fn.__name__
    _LIBRARY.define(name + torch.library.infer_schema(fn, mutates_args=()))
    _LIBRARY.impl(name, fn, "CompositeExplicitAutograd")
    return getattr(torch.ops.stun, name).default


@_opaque_op
def route_pairs(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`align_pairs` with the ``block_m`` of :func:`pairs_layout`, in buffers of
    :func:`layout_bound` lengths: the layout is their prefix (``n_blocks * block_m`` ids,
    ``n_blocks`` experts), the rest is unspecified. :func:`sparse24_experts_mm` reads the prefix."""
    flat = top_k_index.reshape(-1)
    n_pairs = flat.numel()
    ids_len, blocks_len = layout_bound(n_pairs, num_experts)
    sorted_ids = torch.empty(ids_len, dtype=torch.int32, device=flat.device)
    block_expert = torch.empty(blocks_len, dtype=torch.int32, device=flat.device)
    if n_pairs == 0:
        return sorted_ids, block_expert
    block_m, n_blocks = pairs_layout(n_pairs, num_experts)
    prefix = (sorted_ids[: n_blocks * block_m], block_expert[:n_blocks])
    if flat.is_cuda:
        from .triton_align import launch_align

        launch_align(flat, num_experts, block_m, out=prefix)
    else:
        for buffer, part in zip(prefix, align_pairs(flat, num_experts, block_m)):
            buffer.copy_(part)
    return sorted_ids, block_expert


@torch.library.register_fake("stun::route_pairs")
def _(top_k_index, num_experts):
    ids_len, blocks_len = layout_bound(top_k_index.numel(), num_experts)
    return top_k_index.new_empty(ids_len, dtype=torch.int32), top_k_index.new_empty(blocks_len, dtype=torch.int32)


@_opaque_op
def sparse24_experts_mm(
    a: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    sorted_ids: torch.Tensor,
    block_expert: torch.Tensor,
    rows_per_a: int,
) -> torch.Tensor:
    """:func:`sparse24_dispatch_mm` on the layout of :func:`route_pairs`: ``[M * rows_per_a, N]``. The kernel and
    its launch are chosen here, from the concrete sizes of this call."""
    n_pairs = a.shape[0] * rows_per_a
    if n_pairs == 0:
        return a.new_empty(0, values.shape[1])
    block_m, n_blocks = pairs_layout(n_pairs, values.shape[0])
    return sparse24_dispatch_mm(
        a, values, meta, sorted_ids[: n_blocks * block_m], block_expert[:n_blocks], rows_per_a, block_m
    )


@torch.library.register_fake("stun::sparse24_experts_mm")
def _(a, values, meta, sorted_ids, block_expert, rows_per_a):
    return a.new_empty(a.shape[0] * rows_per_a, values.shape[1])


def _check(self) -> None:
    if not is_sparse24(self):
        raise NotSparseExpertsError(
            f"{type(self).__name__} holds dense weights but config._experts_implementation is {IMPLEMENTATION!r}; "
            "convert the model with stun_lightning.sparse.sparsify(model), or load a compressed export with "
            "stun_lightning.export.load_exported(path)"
        )


def _finish(self, out: torch.Tensor) -> torch.Tensor:
    if getattr(self, "has_post_expert_norm", False):
        out = self.post_expert_norm(out)
    return out


#: set by :func:`tracing_for_aoti` while ``torch.export`` traces a model for an AOTInductor package
_tracing_for_aoti = False


@contextlib.contextmanager
def tracing_for_aoti():
    """Trace the experts into the Triton ops inside this block (an AOTInductor package holds no
    Python op): what :func:`stun_lightning.export.export` does for ``format="aoti"``.

    Not ``torch.compiler.is_exporting()``: torch 2.11 returns True there under ``torch.compile`` too,
    which traced the kernel choice into the graph (a graph break at ``storage_offset()``)."""
    global _tracing_for_aoti
    before, _tracing_for_aoti = _tracing_for_aoti, True
    try:
        yield
    finally:
        _tracing_for_aoti = before


def _grouped_forward(
    self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    num_tokens, hidden = hidden_states.shape
    top_k = top_k_index.shape[-1]
    num_experts = self.gate_up_proj_values.shape[0]
    if _tracing_for_aoti:
        # AOTInductor packages hold no Python op: trace into the Triton ops (export has static shapes)
        block_m = block_m_for(num_tokens * top_k, num_experts)
        sorted_ids, block_expert = align(top_k_index, num_experts, block_m)

        def mm(a, values, meta, rows_per_a):
            return sparse24_dispatch_mm(a, values, meta, sorted_ids, block_expert, rows_per_a, block_m)
    else:
        sorted_ids, block_expert = route_pairs(top_k_index, num_experts)

        def mm(a, values, meta, rows_per_a):
            return sparse24_experts_mm(a, values, meta, sorted_ids, block_expert, rows_per_a)

    flat = top_k_index.reshape(-1)
    x = hidden_states.to(self.gate_up_proj_values.dtype)
    gate_up = mm(x, self.gate_up_proj_values, self.gate_up_proj_meta, top_k)
    if getattr(self, "has_bias", False):
        gate_up = gate_up + self.gate_up_proj_bias[flat]
    h = self._apply_gate(gate_up)
    out = mm(h, self.down_proj_values, self.down_proj_meta, 1)
    if getattr(self, "has_bias", False):
        out = out + self.down_proj_bias[flat]
    out = _finish(self, out)
    # weighted sum over each token's experts, accumulated in float32 (as transformers' grouped_mm path)
    out = out.float() * top_k_weights.reshape(-1, 1).float()
    return out.view(num_tokens, top_k, hidden).sum(dim=1).to(hidden_states.dtype)


def _reference_forward(
    self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    final = torch.zeros_like(hidden_states)
    num_experts = self.gate_up_proj_values.shape[0]
    with torch.no_grad():
        hit = torch.bincount(top_k_index.reshape(-1), minlength=num_experts).nonzero().flatten().tolist()
    for e in hit:
        token_idx, slot = torch.where(top_k_index == e)
        x = hidden_states[token_idx].to(self.gate_up_proj_values.dtype)
        gate_up = x @ decompress_24(self.gate_up_proj_values[e], self.gate_up_proj_meta[e]).t()
        if getattr(self, "has_bias", False):
            gate_up = gate_up + self.gate_up_proj_bias[e]
        h = self._apply_gate(gate_up)
        out = h @ decompress_24(self.down_proj_values[e], self.down_proj_meta[e]).t()
        if getattr(self, "has_bias", False):
            out = out + self.down_proj_bias[e]
        out = _finish(self, out) * top_k_weights[token_idx, slot, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


def sparse24_experts_forward(
    self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """``ExpertsInterface`` entry: ``hidden_states [T, H]``, ``top_k_index/weights [T, k]`` -> ``[T, H]``."""
    _check(self)
    if hidden_states.is_cuda or _tracing_for_aoti or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return _grouped_forward(self, hidden_states, top_k_index, top_k_weights)
    return _reference_forward(self, hidden_states, top_k_index, top_k_weights)


ExpertsInterface.register(IMPLEMENTATION, sparse24_experts_forward)
