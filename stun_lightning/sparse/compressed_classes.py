"""The classes of compressed experts modules: cached subclasses of a transformers experts class whose
fused expert matrices are properties that decompress on each access (for inspection; the forward
runs from the compressed buffers and never builds them).

``sparse_class``: every matrix 2:4 (``stun_sparse24``); ``mixed_class``: each matrix in its own
format, 2:4, bitmap or a dense parameter (``stun_bitmap``). :mod:`.convert` swaps them in.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .bitmap import BITMAP, decompress_bitmap
from .bitmap_experts import SPARSE24
from .experts import EXPERT_MATRICES
from .format import decompress_24


def _decompressed(experts, name: str, fmt: str) -> torch.Tensor:
    """Matrix ``name`` of a compressed experts module rebuilt dense from its ``fmt`` ("2:4" or
    "bitmap") buffers, oriented as the dense module stores it (GPT-OSS: ``[E, in, out]``)."""
    if fmt == BITMAP:
        dense = decompress_bitmap(
            getattr(experts, f"{name}_bitmap"),
            getattr(experts, f"{name}_values"),
            getattr(experts, f"{name}_offsets"),
            experts._stun_in_features[name],
        )
    else:
        dense = decompress_24(getattr(experts, f"{name}_values"), getattr(experts, f"{name}_meta"))
    return dense.transpose(1, 2) if experts.is_transposed else dense


def _dense_view(name: str):
    def getter(self) -> torch.Tensor:
        return _decompressed(self, name, SPARSE24)

    return property(
        getter, doc=f"Dense ``{name}`` decompressed on each access (inspection only; the forward never builds it)."
    )


def _compressed_subclass(dense_class: type, prefix: str, flag: str, view) -> type:
    """A subclass of ``dense_class`` whose expert matrices are the properties ``view(name)``."""
    attrs = {name: view(name) for name in EXPERT_MATRICES}
    attrs.update({flag: True, "_stun_dense_class": dense_class, "__module__": dense_class.__module__})
    return type(f"{prefix}{dense_class.__name__}", (dense_class,), attrs)


@lru_cache(maxsize=None)
def sparse_class(dense_class: type) -> type:
    """The compressed counterpart of a transformers experts class (a cached subclass)."""
    return _compressed_subclass(dense_class, "Sparse24", "_stun_sparse24", _dense_view)


def _mixed_view(name: str):
    def getter(self) -> torch.Tensor:
        if name in self._parameters:
            return self._parameters[name]
        return _decompressed(self, name, self._stun_formats[name])

    return property(getter, doc=f"``{name}``: the dense parameter, or decompressed on each access (inspection only).")


@lru_cache(maxsize=None)
def mixed_class(dense_class: type) -> type:
    """The ``stun_bitmap`` counterpart of a transformers experts class (a cached subclass)."""
    return _compressed_subclass(dense_class, "Bitmap", "_stun_mixed", _mixed_view)


def _parts(fmt: str) -> tuple[str, ...]:
    return {BITMAP: ("bitmap", "values", "offsets"), SPARSE24: ("values", "meta")}.get(fmt, ())
