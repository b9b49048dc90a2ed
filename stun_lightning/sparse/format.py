"""Compact 2:4 storage of fused expert weights: kept values plus 2-bit positions.

A weight ``[..., out, in]`` whose every group of 4 consecutive inputs of a row holds at most 2
nonzeros is stored as

* ``values [..., out, in/2]`` (the weight's dtype): the two kept entries of each group, in input
  order;
* ``meta [..., out, ceil(in/8)]`` (uint8): per group one nibble ``i0 | i1 << 2`` with the positions
  ``0 <= i0 < i1 <= 3`` of those two entries; group ``2j`` in the low nibble of byte ``j``, group
  ``2j + 1`` in the high nibble.

That is 0.5625 of the dense bf16 bytes (values 0.5, metadata 1/16). A group with fewer than two
nonzeros stores zeros at the lowest free positions, so the encoding of a weight is unique and
:func:`decompress_24` gives back exactly the input. The layout is our own (row-major values and
nibbles that a Triton kernel streams tile by tile), not cuSPARSELt's or CUTLASS's reordered one.
"""

from __future__ import annotations

import torch

#: marker written with a compressed checkpoint, and the layout version inside it
FORMAT_NAME = "stun-sparse24"
FORMAT_VERSION = 1


class Not24SparseError(ValueError):
    """A tensor cannot be stored 2:4: some group of 4 inputs has more than 2 nonzeros, or the input
    dimension is not a multiple of 4."""


def _lookup_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """(i0, i1) for each 4-bit nonzero pattern: its nonzero positions, then the lowest free ones."""
    first, second = [], []
    for pattern in range(16):
        nonzero = [p for p in range(4) if pattern >> p & 1]
        free = [p for p in range(4) if not pattern >> p & 1]
        keep = sorted((nonzero + free)[:2]) if len(nonzero) <= 2 else [0, 1]
        first.append(keep[0])
        second.append(keep[1])
    return torch.tensor(first, dtype=torch.uint8), torch.tensor(second, dtype=torch.uint8)


_I0, _I1 = _lookup_tables()


def _check_in_features(in_features: int, name: str) -> None:
    if in_features % 4:
        raise Not24SparseError(
            f"{name}: 2:4 storage needs the input dimension divisible by 4, got {in_features}; "
            'export this model with format="hf" (dense storage with zeros) instead'
        )


def violations_24(weight: torch.Tensor) -> torch.Tensor:
    """Boolean ``[..., out, in/4]``: groups of 4 inputs with more than 2 nonzeros."""
    _check_in_features(weight.shape[-1], "weight")
    groups = weight.reshape(*weight.shape[:-1], weight.shape[-1] // 4, 4)
    return (groups != 0).sum(-1) > 2


def check_24(weight: torch.Tensor, name: str = "weight") -> None:
    """Raise :class:`Not24SparseError` naming ``name`` unless ``weight`` ``[..., out, in]`` is 2:4."""
    _check_in_features(weight.shape[-1], name)
    bad = violations_24(weight)
    if bool(bad.any()):
        first = [int(i) for i in bad.nonzero()[0]]
        where = ", ".join(f"{axis}={i}" for axis, i in zip(("expert", "row", "group")[-len(first) :], first))
        raise Not24SparseError(
            f"{name} is not 2:4 sparse: {int(bad.sum())} of {bad.numel()} groups of 4 inputs keep more than 2 "
            f"nonzeros (first at {where}); prune with pattern: \"2:4\" (StunRecipe(pattern='2:4'), without OWL's "
            'per-layer N:M) before compressing, or export with format="hf"'
        )


def compress_24(weight: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, meta)`` of a 2:4 ``weight`` ``[..., out, in]``; raises :class:`Not24SparseError` otherwise."""
    check_24(weight, name)
    *lead, in_features = weight.shape
    n_groups = in_features // 4
    groups = weight.detach().reshape(*lead, n_groups, 4)
    nonzero = (groups != 0).to(torch.uint8)
    pattern = nonzero[..., 0] | nonzero[..., 1] << 1 | nonzero[..., 2] << 2 | nonzero[..., 3] << 3
    pattern = pattern.long()
    i0, i1 = _I0.to(weight.device)[pattern], _I1.to(weight.device)[pattern]
    index = torch.stack((i0, i1), dim=-1).long()
    values = groups.gather(-1, index).reshape(*lead, n_groups * 2)
    nibbles = i0 | i1 << 2
    if n_groups % 2:
        nibbles = torch.cat((nibbles, torch.zeros_like(nibbles[..., :1])), dim=-1)
    meta = nibbles[..., 0::2] | nibbles[..., 1::2] << 4
    return values.contiguous(), meta.contiguous()


def unpack_positions(meta: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(i0, i1)`` ``[..., n_groups]`` (int64) from packed metadata."""
    nibbles = torch.stack((meta & 0xF, meta >> 4), dim=-1).reshape(*meta.shape[:-1], meta.shape[-1] * 2)[..., :n_groups]
    return (nibbles & 3).long(), (nibbles >> 2).long()


def decompress_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense weight ``[..., out, in]`` that :func:`compress_24` stored as ``(values, meta)``."""
    *lead, half = values.shape
    n_groups = half // 2
    if meta.dtype != torch.uint8 or meta.shape[:-1] != values.shape[:-1] or meta.shape[-1] != (n_groups + 1) // 2:
        raise ValueError(
            f"2:4 metadata {tuple(meta.shape)} ({meta.dtype}) does not match values {tuple(values.shape)}: "
            f"expected uint8 {(*lead, (n_groups + 1) // 2)}"
        )
    i0, i1 = unpack_positions(meta, n_groups)
    pairs = values.reshape(*lead, n_groups, 2)
    dense = torch.zeros(*lead, n_groups, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, torch.stack((i0, i1), dim=-1), pairs)
    return dense.reshape(*lead, n_groups * 4)


def compressed_nbytes(out_features: int, in_features: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of one compressed ``[out, in]`` matrix (values + metadata)."""
    item = torch.empty((), dtype=dtype).element_size()
    return out_features * (in_features // 2 * item + (in_features // 4 + 1) // 2)
