"""Spawning the ranks of a distributed test: N processes on one host, a timeout that turns a hung
collective into a failure, and each rank's traceback shown in the test's failure message."""

from __future__ import annotations

import os
import socket
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_rank_env(rank: int, port: int, world: int) -> None:
    """The environment Lightning and ``init_process_group`` read; NVLink multicast off; one thread."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        NCCL_NVLS_ENABLE="0",
        TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
    )
    torch.set_num_threads(1)


@contextmanager
def rank_failures_recorded(out_dir: str, rank: int):
    """Write the rank's traceback to ``error<rank>.txt`` if it fails; leave the process group."""
    try:
        yield
    except BaseException:
        Path(out_dir, f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_ranks(worker, out: Path, *args, world: int, timeout_s: float) -> float:
    """Run ``worker(rank, port, str(out), *args)`` in ``world`` spawned processes; seconds taken.
    Fails the test (with every rank's traceback) on an error or after ``timeout_s``."""
    start = time.perf_counter()
    ctx = mp.start_processes(
        worker, args=(free_port(), str(out), *args), nprocs=world, join=False, start_method="spawn"
    )
    deadline = start + timeout_s
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.perf_counter())):
            if time.perf_counter() > deadline:
                raise TimeoutError(f"the {world} spawned ranks did not finish within {timeout_s} s")
    except Exception as err:
        errors = "\n".join(p.read_text() for p in sorted(out.glob("error*.txt")))
        pytest.fail(f"spawned ranks failed: {err}\n{errors}")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return time.perf_counter() - start
