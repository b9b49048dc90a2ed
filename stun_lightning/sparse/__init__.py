"""Sparse inference for pruned MoE models: compressed experts, their kernels, their checkpoint.

    from stun_lightning.sparse import sparsify, sparse_formats
    sparsify(model)                      # each expert matrix -> 2:4, bitmap or dense, from its mask
    sparse_formats(model)                # {layer: {"gate_up_proj": "bitmap", "down_proj": "2:4"}}
    model.generate(...)                  # unchanged; on CUDA the Triton kernels run the experts

All-2:4 models run with ``stun_sparse24``, any other mix with ``stun_bitmap``
(:mod:`.bitmap_experts`); importing this package registers both in transformers' ``ExpertsInterface``.
"""

from .checkpoint import is_sparse_checkpoint, load_sparse, save_sparse
from .bitmap import compress_bitmap, decompress_bitmap
from .convert import SparsifyConfig, densify, is_sparsified, plan_formats, sparse_formats, sparse_nbytes, sparsify
from .experts import IMPLEMENTATION, NotSparseExpertsError, align_pairs, sparse24_experts_forward
from .format import FORMAT_NAME, Not24SparseError, check_24, compress_24, decompress_24

__all__ = [
    "FORMAT_NAME",
    "IMPLEMENTATION",
    "Not24SparseError",
    "SparsifyConfig",
    "compress_bitmap",
    "decompress_bitmap",
    "plan_formats",
    "sparse_formats",
    "NotSparseExpertsError",
    "align_pairs",
    "check_24",
    "compress_24",
    "decompress_24",
    "densify",
    "is_sparse_checkpoint",
    "is_sparsified",
    "load_sparse",
    "save_sparse",
    "sparse24_experts_forward",
    "sparse_nbytes",
    "sparsify",
]
