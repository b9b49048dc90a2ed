"""The sparse tensor-core kernels of :mod:`.cuda_mma` compiled for one device: their shapes, their
shared memory, and ``torch.cuda._compile_kernel`` (NVRTC) over ``cuda_mma.cu`` / ``cuda_wgmma.cu``
(beside this file), each once per device (None, with a warning, where it does not compile)."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch

#: output rows per warp, warps per CTA, steps of 64 inputs loaded ahead per iteration
ROWS_PER_WARP, WARPS, UNROLL = 16, 4, 4
#: the prefill kernel's tile: weight rows x pairs (a block of align_pairs), and the steps of 64
#: inputs it keeps in flight
TILE_ROWS, TILE_PAIRS, TILE_STAGES = 128, 128, 3


def _stage_bytes(rows: int) -> int:
    """One pipeline stage of the prefill kernels: a step's values, activations and metadata words."""
    return rows * 64 + TILE_PAIRS * 128 + rows * 8


def tile_smem_bytes(rows: int, stages: int = TILE_STAGES) -> int:
    """Shared memory of the ``mma.sp`` prefill kernel: ``stages`` stages."""
    return stages * _stage_bytes(rows)


def wgmma_smem_bytes(rows: int, stages: int, consumers: int = 0) -> int:
    """Shared memory of the ``wgmma`` prefill kernels: stages padded to 1 KiB, 1 KiB to align them,
    and for the warp-specialized one (``consumers`` > 0) two mbarriers per stage and the pairs' rows."""
    extra = 16 * stages + 4 * TILE_PAIRS if consumers else 0
    return stages * (-(-_stage_bytes(rows) // 1024) * 1024) + 1024 + extra


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


@functools.cache
def _kernel(device_index: int, warps: int = WARPS, unroll: int = UNROLL):
    """The decode kernel compiled for one device, or None (with a warning) where NVRTC is missing or fails."""
    return _compile(device_index, f"sparse24_mma<{warps}, {unroll}>")


@functools.cache
def _tile_kernel(device_index: int, rows: int = TILE_ROWS, stages: int = TILE_STAGES):
    """The prefill kernel compiled for one device (its shared memory limit raised), or None."""
    return _compile(
        device_index, f"sparse24_mma_tile<{rows // 64}, {stages}>", shared_mem=tile_smem_bytes(rows, stages)
    )


@functools.cache
def _wgmma_kernel(device_index: int, rows: int, stages: int, ctas: int, consumers: int):
    """A Hopper prefill kernel (``cuda_wgmma.cu``) compiled for one device, or None: the
    warp-specialized one with ``consumers`` warpgroups (and one producer warpgroup), else the
    single-role one with ``ctas`` CTAs per multiprocessor."""
    if consumers:
        name = f"sparse24_wgmma_ws<{consumers}, {rows // (64 * consumers)}, {stages}, 4>"
    else:
        name = f"sparse24_wgmma_tile<{rows // 64}, {stages}, {ctas}>"
    return _compile(device_index, name, hopper=True, shared_mem=wgmma_smem_bytes(rows, stages, consumers))


def _compile(device_index: int, name: str, hopper: bool = False, shared_mem: int = 0):
    """``name`` from ``cuda_mma.cu`` (with ``cuda_wgmma.cu`` appended and for sm_90a when ``hopper``),
    its dynamic shared memory limit raised to ``shared_mem`` bytes where given."""
    files = ("cuda_mma.cu", "cuda_wgmma.cu") if hopper else ("cuda_mma.cu",)
    source = "\n".join(Path(__file__).with_name(f).read_text() for f in files)
    major, minor = _capability(device_index)
    arch = "90a" if hopper else f"{major}{minor}"
    try:
        with torch.cuda.device(device_index):
            kernel = torch.cuda._compile_kernel(source, name, compute_capability=arch, nvcc_options=["--std=c++17"])
            if shared_mem:
                kernel.set_shared_memory_config(shared_mem)
            return kernel
    except (
        OSError,
        RuntimeError,
        AttributeError,
    ) as err:  # no NVRTC library, it refused the source, or a torch without _compile_kernel
        warnings.warn(
            f"stun_lightning: the sparse tensor-core kernel {name} did not compile ({err}); using the Triton kernels",
            stacklevel=3,
        )
        return None


@torch._dynamo.assume_constant_result
def multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count
