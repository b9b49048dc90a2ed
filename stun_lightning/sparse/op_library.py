"""The ``stun`` fragment of ``torch.library`` that :mod:`.cuda_mma` defines its CUDA ops in."""

from __future__ import annotations

import torch

_LIBRARY = torch.library.Library("stun", "FRAGMENT")


def _cuda_op(fn):
    """``fn`` as the CUDA kernel of a new op ``torch.ops.stun.<name>`` (schema from its annotations),
    returned as that op, without ``torch.library.custom_op``'s autograd and aliasing wrappers: the op
    over the direct call cost 53.2 against 32.5 us of CPU as a ``custom_op`` and 49.5 against 31.3
    us this way on the H100 host (``benchmarks/investigations/launch_overhead.py``, one run each;
    ``benchmarks/results/launch_overhead_h100.md``); most of it is the dispatcher calling into
    Python. No autograd formula: these ops serve inference."""
    name = fn.__name__
    _LIBRARY.define(name + torch.library.infer_schema(fn, mutates_args=()))
    _LIBRARY.impl(name, fn, "CUDA")
    return getattr(torch.ops.stun, name).default
