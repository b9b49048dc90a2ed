"""Which Lightning strategies StunCallback's masks can follow, and the FSDP2 strategy they follow.

Single device, DDP, and FSDP2 through ``ModelParallelStrategy`` with the whole world on the
data-parallel axis (``tensor_parallel_size=1``; :class:`FSDP2Strategy` sets that from ``devices``),
on GPUs (NCCL) or CPUs (gloo). FSDP1 flattens parameters and DeepSpeed partitions them, so a mask
cannot name a weight there: both are refused with the fix named.

Across processes StunCallback splits the structured phase's calibration over ranks and all-reduces
its statistics (``stun_lightning.distributed``), broadcasts rank 0's expert sets to every rank,
and sums mask statistics over ranks, so every rank holds the same expert sets and masks. Under
FSDP2 the structured phase runs in ``setup``, on every rank's whole model, before the module's
``configure_model`` shards it; masks are computed from each layer's gathered weights and enforced
on each rank's own shard of the weights, gradients and optimizer state (``stun_lightning.sharding``,
``.expert_masks``); checkpoints during the fit are sharded (a directory, one file per rank), and the
final ``save_dir`` is one consolidated directory written by rank 0.

Resuming a sharded checkpoint: the model is sharded before the strategy reads the checkpoint, so
the expert sets must be right at ``setup``. They are read there when ``trainer.ckpt_path`` is set
before ``fit`` (``stun-lightning fit --ckpt_path`` does this); with ``fit(ckpt_path=...)`` the
structured phase runs again and its (deterministic) choice is checked against the checkpoint's
before any tensor loads, refused with the fix named if it differs.
"""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.strategies import ModelParallelStrategy

from stun_lightning.sharding import set_nccl_env


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` as plain FSDP2: every process on the data-parallel axis (each reads
    its own batches, the model is sharded over all of them), no tensor parallelism; a sharded
    (distributed) checkpoint during the fit. ``devices`` alone sets the world size, so
    ``--trainer.devices=N`` needs no other change."""

    def __init__(self, save_distributed_checkpoint: bool = True, **kwargs) -> None:
        set_nccl_env()  # before the launcher starts the other processes: they inherit it
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,
        )

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def data_parallel_mesh(mesh):
    """The 1-D mesh FSDP2 shards over: the data-parallel axis of ModelParallelStrategy's mesh,
    refused when a tensor-parallel axis is set (the experts would need a tensor-parallel plan)."""
    if mesh.mesh_dim_names and "tensor_parallel" in mesh.mesh_dim_names:
        tp = mesh["tensor_parallel"].size()
        if tp > 1:
            dp = mesh["data_parallel"].size()
            raise ValueError(
                f"ModelParallelStrategy here has tensor_parallel_size={tp} (data_parallel_size={dp}), but stun-lightning "
                "shards with FSDP2 only, over the data-parallel axis: use "
                f"ModelParallelStrategy(data_parallel_size={dp * tp}, tensor_parallel_size=1) or "
                "strategy=stun_lightning.callbacks.FSDP2Strategy() (which sets both from devices)"
            )
        return mesh["data_parallel"]
    if mesh.ndim != 1:
        raise ValueError(f"expected a 1-D data-parallel device mesh, got {mesh}")
    return mesh


def check_strategy(trainer: Trainer) -> None:
    """Refuse strategies whose parameter layout the masks cannot reach, naming what works."""
    strategy = trainer.strategy
    name = type(strategy).__name__
    if isinstance(strategy, ModelParallelStrategy):
        data_parallel_mesh(strategy.device_mesh)
        return
    if name == "FSDPStrategy":
        raise RuntimeError(
            "StunCallback: FSDPStrategy (FSDP1) flattens parameters, so masks cannot reach every rank's shard; use "
            "strategy=stun_lightning.callbacks.FSDP2Strategy() (FSDP2) or strategy='ddp'"
        )
    if "DeepSpeed" in name:
        raise RuntimeError(
            f"StunCallback: {name} partitions the expert tensors, which masks cannot follow; use "
            "strategy=stun_lightning.callbacks.FSDP2Strategy() (FSDP2) or strategy='ddp'"
        )
