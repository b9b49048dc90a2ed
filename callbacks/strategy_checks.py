"""Which Lightning strategies StunCallback's masks can follow; the place FSDP2 support will land (issue 13)."""

from __future__ import annotations

from lightning.pytorch import Trainer


def check_strategy(trainer: Trainer) -> None:
    """Refuse strategies whose parameter layout the masks cannot reach, naming what works."""
    strategy = trainer.strategy
    name = type(strategy).__name__
    if name == "ModelParallelStrategy":
        if strategy.root_device.type != "cuda":
            raise RuntimeError(
                "StunCallback: ModelParallelStrategy (FSDP2) needs CUDA GPUs and none is in use here; on CPU use "
                "strategy='ddp' (devices=N, accelerator='cpu'), or run on GPUs"
            )
        raise NotImplementedError(
            "StunCallback does not yet write masks into FSDP2's DTensor shards (ModelParallelStrategy); use "
            "strategy='ddp' while the model, its teacher and optimizer state fit on one GPU"
        )
    if name == "FSDPStrategy":
        raise RuntimeError(
            "StunCallback: FSDPStrategy (FSDP1) flattens parameters, so masks cannot reach every rank's shard; use "
            "strategy='ddp' (FSDP2 through ModelParallelStrategy is planned, issue 13)"
        )
    if "DeepSpeed" in name:
        raise RuntimeError(f"StunCallback: {name} partitions the expert tensors, which masks cannot follow; use strategy='ddp'")
