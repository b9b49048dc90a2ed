"""Which storage :func:`~stun_lightning.sparse.sparsify` gives each fused expert matrix:
:class:`SparsifyConfig` (the formats allowed, in order, and when bitmap storage pays) and
:func:`choose_format` (the first that fits one matrix's mask)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .bitmap import BITMAP, estimated_bitmap_nbytes
from .bitmap_experts import DENSE, SPARSE24
from .format import check_24, violations_24


@dataclass
class SparsifyConfig:
    """How :func:`sparsify` chooses each fused expert matrix's storage.

    ``formats``: the storages it may pick, tried in this order: ``"2:4"`` (the mask keeps at most 2
    of every 4 inputs), ``"bitmap"`` (any mask, when it pays), ``"dense"`` (kept as is). A matrix
    that fits none of them is an error; ``formats=("2:4",)`` is the strict 2:4 conversion, which
    raises :class:`~stun_lightning.sparse.Not24SparseError` naming the layer.
    ``max_bytes_ratio``: bitmap storage is used only when its bytes (values + 1/8 byte of bitmap +
    1/16 of offsets per weight, :mod:`.bitmap`) are at most this fraction of the dense bytes: the
    default 0.8 asks for at least 1.25x fewer bytes, i.e. about 35% sparsity or more in bf16; below
    it the matrix stays dense (our choice, not from a paper).
    """

    formats: tuple[str, ...] = (SPARSE24, BITMAP, DENSE)
    max_bytes_ratio: float = 0.8

    def __post_init__(self):
        self.formats = tuple(self.formats)
        unknown = set(self.formats) - {SPARSE24, BITMAP, DENSE}
        if unknown or not self.formats:
            raise ValueError(
                f"SparsifyConfig.formats: unknown {sorted(unknown)}; choose among '2:4', 'bitmap', 'dense'"
            )
        if not 0 < self.max_bytes_ratio <= 1:
            raise ValueError(f"SparsifyConfig.max_bytes_ratio must be in (0, 1], got {self.max_bytes_ratio}")


def choose_format(weight: torch.Tensor, config: SparsifyConfig, label: str = "weight") -> str:
    """The storage :func:`sparsify` gives ``weight`` ``[E, out, in]`` under ``config``."""
    for fmt in config.formats:
        if fmt == SPARSE24 and weight.shape[-1] % 4 == 0 and not bool(violations_24(weight).any()):
            return SPARSE24
        if (
            fmt == BITMAP
            and estimated_bitmap_nbytes(weight) <= config.max_bytes_ratio * weight.numel() * weight.element_size()
        ):
            return BITMAP
        if fmt == DENSE:
            return DENSE
    if SPARSE24 in config.formats:
        check_24(weight, label)  # raises, naming the first group that is not 2:4
    raise ValueError(
        f"{label}: bitmap storage would take more than {config.max_bytes_ratio} of its dense bytes; "
        "raise SparsifyConfig.max_bytes_ratio or allow 'dense' in SparsifyConfig.formats"
    )
