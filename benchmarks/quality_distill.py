"""The distillation rows of ``benchmarks/quality.py`` (issue 10): a short ``StunDistillModule`` fit of
a pruned copy, its masks held fixed, with the dense model as teacher or with cross-entropy only."""

from __future__ import annotations

import copy
import time

import torch

from stun_lightning.distill import kept_from_removed
from stun_lightning.expert_masks import masks_from_zeros, measured_sparsity


def distill(dense, student, report, args, teacher: bool) -> dict:
    """A short StunDistillModule fit of the pruned ``student`` with its masks held fixed.

    teacher=True: expert-wise KD (CE + lambda * expert MSE, lambda = L_CE / L_expert at the first
    step, MoE-Pruner) from a frozen copy of the dense model, survivors matched to their originals
    with the report's removed experts; teacher=False: the same fit with CE only (the control).
    The masks are the student's zeros after pruning: gradients are masked before every optimizer
    step and weights re-zeroed after it (``stun_lightning.expert_masks``), so sparsity cannot change.
    """
    from lightning.pytorch import Callback, Trainer, seed_everything

    from stun_lightning.callbacks import FixedMasks, StunDataModule, StunDistillModule

    masks = masks_from_zeros(student)
    sparsity_before = measured_sparsity(student)

    class Losses(Callback):
        def __init__(self):
            self.first = self.last = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses = {k: float(v) for k, v in pl_module.last_losses.items()}
            self.first = self.first or losses
            self.last = losses

    seed_everything(0, verbose=False)
    module = StunDistillModule(
        student=student,
        teacher=copy.deepcopy(dense) if teacher else None,
        expert_map=kept_from_removed(dense, report.removed_experts) if teacher else None,
        teacher_dtype=None,  # fp32 like the student (bf16 matmuls are slow on CPUs)
        lr=args.distill_lr,
        warmup_steps=max(1, args.distill_steps // 10),
        min_lr_ratio=0.1,
    )
    data = StunDataModule(seq_len=128, batch_size=args.distill_batch, seed=0)
    losses = Losses()
    trainer = Trainer(
        accelerator="gpu" if args.device.type == "cuda" else "cpu",
        devices=1,
        max_steps=args.distill_steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[FixedMasks(masks), losses],
    )
    start = time.perf_counter()
    with torch.enable_grad():
        trainer.fit(module, data)
    student.eval()
    if abs(measured_sparsity(student) - sparsity_before) > 1e-9:
        raise RuntimeError(
            f"masks moved during distillation: {sparsity_before:.4f} -> {measured_sparsity(student):.4f}"
        )
    return {
        "steps": trainer.global_step,
        "fit_seconds": time.perf_counter() - start,
        "first": losses.first,
        "last": losses.last,
    }
