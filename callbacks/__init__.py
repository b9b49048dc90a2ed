"""Lightning layer of stun-lightning: prune during ``trainer.fit`` and recover with distillation.

    from stun_lightning import StunRecipe
    from stun_lightning.callbacks import StunCallback, StunDataModule, StunDistillModule
    from stun_lightning.schedule import SparsitySchedule

    trainer = Trainer(max_steps=300, callbacks=[StunCallback(StunRecipe(expert_sparsity=0.25, sparsity=0.5),
                                                             SparsitySchedule("cubic", end_step=200), update_every=20)])
    trainer.fit(StunDistillModule("tiny:mixtral"), StunDataModule())

The only package of stun-lightning that imports Lightning; the work is done by the core.
"""

from stun_lightning.lora import merge_lora
from stun_lightning.schedule import SparsitySchedule

from .datamodule import StunDataModule
from .distill_module import StunDistillModule
from .fixed_masks import FixedMasks
from .strategy_checks import FSDP2Strategy
from .stun_callback import StunCallback

__all__ = [
    "FSDP2Strategy",
    "FixedMasks",
    "SparsitySchedule",
    "StunCallback",
    "StunDataModule",
    "StunDistillModule",
    "merge_lora",
]
