"""Calibration across the processes of a ``torch.distributed`` job: each rank streams its slice of
the calibration token ids, and every layer's statistics are summed over ranks, so N processes
end with the single-process statistics (up to float summation order) in about 1/N of the time.

Framework-free: it needs only an initialised default process group (Lightning's DDP and
ModelParallel strategies, ``torchrun``, or ``init_process_group`` by hand). Two ways in:

* :func:`calibrate_distributed`: :func:`stun_lightning.calibration.calibrate` split across ranks;
* :func:`calibration_across_ranks`: a context in which *every* ``calibrate`` call is split, also the
  ones expert methods make internally (``select_experts`` / ``prune`` need no new arguments).

How the structured decision stays identical on every rank: every rank holds the same all-reduced
statistics (an all-reduce hands every rank the same bits) and runs the same deterministic selection;
callers then adopt rank 0's expert sets with :func:`broadcast_object`, so a method with its own
non-reduced passes or non-deterministic kernels cannot make ranks diverge (``StunCallback`` does).

Rows are split contiguously (rank r takes rows ``[r*N/W, (r+1)*N/W)``), so the MoE-block inputs
kept for reconstruction methods (``keep_block_io``), gathered in rank order, are exactly the rows a
single process would keep. Every rank must pass the same token ids; this is checked.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from .calibration import _PARTITION, CalibrationStats, LayerStats, calibrate


def is_distributed(group=None) -> bool:
    """Whether a process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _comm_device(group=None) -> torch.device:
    # NCCL reduces only CUDA tensors; gloo and the rest take CPU tensors
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_layer_stats(stats: LayerStats, group=None, keep_block_io: int = 0) -> LayerStats:
    """Sum ``stats`` over the ranks of ``group`` in place (one all-reduce per dtype); returns it.

    Block inputs/outputs (only when ``keep_block_io`` > 0) are gathered in rank order and cut to
    ``keep_block_io`` rows. Every rank must call this for the same layer with the same fields.
    """
    device = _comm_device(group)
    entries = stats.summed()
    tokens = torch.tensor([stats.tokens], dtype=torch.long)
    by_dtype: dict[torch.dtype, list[tuple[int, torch.Tensor]]] = {}
    for i, (_, _, t) in enumerate(entries):
        by_dtype.setdefault(t.dtype, []).append((i, t))
    by_dtype.setdefault(torch.long, []).append((-1, tokens))
    reduced: dict[int, torch.Tensor] = {}
    for dtype in sorted(by_dtype, key=str):  # same order on every rank
        items = by_dtype[dtype]
        flat = torch.cat([t.detach().reshape(-1).to(device) for _, t in items])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for i, t in items:
            reduced[i] = flat[offset : offset + t.numel()].view(t.shape).to(t.device)
            offset += t.numel()
    stats.tokens = int(reduced[-1].item())
    for i, (name, key, _) in enumerate(entries):
        if key is None:
            setattr(stats, name, reduced[i])
        else:
            getattr(stats, name)[key] = reduced[i]
    if keep_block_io > 0:
        local = (
            torch.cat(stats.block_inputs) if stats.block_inputs else None,
            torch.cat(stats.block_outputs) if stats.block_outputs else None,
        )
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, local, group=group)
        xs = [x for x, _ in gathered if x is not None]
        ys = [y for _, y in gathered if y is not None]
        stats.block_inputs = [torch.cat(xs)[:keep_block_io]] if xs else []
        stats.block_outputs = [torch.cat(ys)[:keep_block_io]] if ys else []
    return stats


@dataclass
class RankPartition:
    """Contiguous rows of the calibration ids per rank, statistics summed over ``group``
    (a :class:`stun_lightning.calibration.CalibrationPartition`)."""

    group: Any = None

    def local(self, input_ids: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        # every rank sees the same check results, so all raise together instead of hanging
        sig = torch.tensor(
            [
                input_ids.shape[0],
                input_ids.numel(),
                int(input_ids.long().sum()),
                int((input_ids.long() * 31 + 7).square().sum() % (2**31)),
            ],
            dtype=torch.long,
        )
        sig = sig.to(_comm_device(self.group))  # NCCL gathers CUDA tensors only, into CUDA tensors
        sigs = [torch.zeros_like(sig) for _ in range(world)]
        dist.all_gather(sigs, sig, group=self.group)
        if any(not torch.equal(s.cpu(), sigs[0].cpu()) for s in sigs):
            raise RuntimeError(
                "ranks were given different calibration token ids; every rank must pass the same [N, L] ids "
                "(draw them from a fixed seed, e.g. StunDataModule.calibration_ids(), or broadcast them from rank 0)"
            )
        if input_ids.shape[0] < world:
            raise ValueError(
                f"{input_ids.shape[0]} calibration sequences cannot be split over {world} ranks; pass at least one "
                "sequence per rank (raise calibration_samples)"
            )
        return torch.tensor_split(input_ids, world, dim=0)[rank]

    def reduce(self, stats: LayerStats, keep_block_io: int = 0) -> LayerStats:
        return all_reduce_layer_stats(stats, self.group, keep_block_io)


@contextmanager
def calibration_across_ranks(group=None) -> Iterator[RankPartition | None]:
    """Within this context every ``calibrate`` call on this process is split across the ranks of
    ``group`` (a no-op without an initialised group of more than one rank). All ranks must enter it
    and make the same calls."""
    if not is_distributed(group):
        yield None
        return
    partition = RankPartition(group)
    token = _PARTITION.set(partition)
    try:
        yield partition
    finally:
        _PARTITION.reset(token)


def calibrate_distributed(model: torch.nn.Module, input_ids: torch.Tensor, *, group=None, **kwargs) -> CalibrationStats:
    """:func:`stun_lightning.calibration.calibrate` with this rank's slice of ``input_ids`` and the
    statistics summed over ``group``; plain ``calibrate`` when not distributed."""
    partition = RankPartition(group) if is_distributed(group) else None
    return calibrate(model, input_ids, partition=partition, **kwargs)


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """``obj`` as rank ``src`` holds it, on every rank (picklable objects; identity when not distributed)."""
    if not is_distributed(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


__all__ = [
    "RankPartition",
    "all_reduce_layer_stats",
    "broadcast_object",
    "calibrate_distributed",
    "calibration_across_ranks",
    "is_distributed",
]
