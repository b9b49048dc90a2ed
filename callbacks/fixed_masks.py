"""Keep a pruned student's masks fixed through a fit (no schedule, no new pruning)."""

from __future__ import annotations

from lightning.pytorch import Callback

from stun_lightning.expert_masks import ExpertMasks, apply_masks, mask_gradients, masks_from_zeros


class FixedMasks(Callback):
    """Zero the masked weights' gradients before each optimizer step and re-apply the masks after
    each batch, so ``pl_module.student`` stays exactly as pruned (what :class:`StunCallback` does
    between its mask updates, for a student pruned beforehand). ``masks`` default: the student's
    zeros at the start of the fit (:func:`~stun_lightning.expert_masks.masks_from_zeros`)."""

    def __init__(self, masks: ExpertMasks | None = None):
        self.masks = masks

    def on_fit_start(self, trainer, pl_module):
        if self.masks is None:
            self.masks = masks_from_zeros(pl_module.student)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        mask_gradients(pl_module.student, self.masks)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        apply_masks(pl_module.student, self.masks)
