"""Sparse inference for pruned MoE models: compressed 2:4 experts, their kernel, their checkpoint.

    from stun_lightning.sparse import sparsify
    sparsify(model)                      # experts -> 2:4 values + metadata, run by "stun_sparse24"
    model.generate(...)                  # unchanged; on CUDA the Triton kernel runs the experts

Importing this package registers ``stun_sparse24`` in transformers' ``ExpertsInterface``.
"""

from .checkpoint import is_sparse_checkpoint, load_sparse, save_sparse
from .convert import densify, is_sparsified, sparse_nbytes, sparsify
from .experts import IMPLEMENTATION, NotSparseExpertsError, align_pairs, sparse24_experts_forward
from .format import FORMAT_NAME, Not24SparseError, check_24, compress_24, decompress_24

__all__ = [
    "FORMAT_NAME",
    "IMPLEMENTATION",
    "Not24SparseError",
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
