"""The end of a StunCallback fit: the report through the trainer's loggers and beside the logs, and
one consolidated ``save_pretrained`` directory in the core's format (``stun_lightning.save_pruned``).

A sharded (FSDP2) model is gathered first, one tensor at a time on every rank (``full_tensor`` is a
collective), and only rank 0 keeps the full tensors and writes; the other ranks wait for it, so the
directory exists on every rank when ``fit`` returns.
"""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from stun_lightning.report import PruneReport
from stun_lightning.serialization import save_pruned
from stun_lightning.sharding import gather_state_dict, is_sharded


def log_report(trainer: Trainer, report: PruneReport) -> None:
    """Log the report's figures to every logger, and write it as JSON and Markdown next to the logs."""
    metrics = {
        "stun/expert_param_sparsity": report.expert_param_sparsity,
        "stun/within_expert_sparsity": report.within_expert_sparsity,
        "stun/model_sparsity": report.model_sparsity,
        "stun/experts_removed": float(sum(len(v) for v in report.removed_experts.values())),
    }
    for i, s in report.layer_sparsity.items():
        metrics[f"stun/layer_{i}/sparsity"] = s
        metrics[f"stun/layer_{i}/experts"] = float(report.experts_after[i])
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        logger.log_hyperparams(
            {"stun_removed_experts": json.dumps({str(k): v for k, v in report.removed_experts.items()})}
        )
        logger.save()
    log_dir = trainer.log_dir if trainer.loggers else None  # a broadcast: every rank asks
    if trainer.is_global_zero and log_dir:
        out = Path(log_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "stun_report.json").write_text(report.to_json())
        (out / "stun_report.md").write_text(report.to_markdown())
    rank_zero_info("StunCallback report:\n" + report.to_markdown())


def save_final_model(
    trainer: Trainer, model: nn.Module, save_dir: str, report: PruneReport, overwrite: bool = False
) -> None:
    """``save_pruned`` the model to ``save_dir`` from rank 0 (every rank must call this)."""
    state = gather_state_dict(model, keep=trainer.is_global_zero) if is_sharded(model) else None
    if trainer.is_global_zero:
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
        save_pruned(
            model,
            save_dir,
            tokenizer=tokenizer,
            overwrite=overwrite,
            extra_files={"stun_report.json": report.to_json()},
            state_dict=state,
        )
    trainer.strategy.barrier("stun_save_final_model")
