"""What each of the 2 ranks of ``test_fsdp.py`` runs: a fit under FSDP2 (StunCallback +
StunDistillModule, a sharded checkpoint every 2 steps), two resumes from that checkpoint, and a
student built on the meta device; a probe records what each rank saw, written to ``rank<r>.pt``."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from spawn_ranks import rank_failures_recorded, set_rank_env
from stun_lightning import StunRecipe, moe_layers
from stun_lightning.tiny import build_tiny_model

WORLD = 2
# 8 -> 5 experts per layer: 5 rows do not split evenly over 2 ranks (FSDP2 shards of 3 and 2)
RECIPE = dict(
    expert_method="frequency",
    expert_sparsity=0.375,
    layer_budget="uniform",
    sparsity=0.5,
    metric="wanda",
    low_token_rule="magnitude",
)
RESUME_FROM = "step=2"


def calibration_ids():
    return torch.randint(0, 1000, (6, 32), generator=torch.Generator().manual_seed(1))


class Probe:
    """A Lightning callback (built inside the worker) recording, after every optimizer step, whether
    each rank's shards of the masked weights and of Adam's moments are zero where its mask says."""

    @staticmethod
    def make(stun, mod):
        from lightning.pytorch import Callback

        from stun_lightning.expert_masks import iter_masked
        from stun_lightning.sharding import full, is_sharded, local_view

        class _Probe(Callback):
            def __init__(self):
                self.steps = self.violations = self.masked_steps = 0
                self.start = self.end = None

            def on_train_start(self, trainer, pl_module):
                self.start = {
                    "kept": dict(stun.kept_experts),
                    "masks": {k: v.clone() for k, v in stun.masks.masks.items()},
                    "step": trainer.global_step,
                }
                opt = trainer.optimizers[0]
                opt.register_step_post_hook(lambda o, a, k: self._check(o))
                teacher = mod.teacher
                in_optimizer = {id(p) for g in opt.param_groups for p in g["params"]}
                self.teacher = (
                    None
                    if teacher is None
                    else {
                        "sharded": is_sharded(teacher),
                        "frozen": not any(p.requires_grad for p in teacher.parameters()),
                        "in_optimizer": any(id(p) in in_optimizer for p in teacher.parameters()),
                        "training": teacher.training,
                    }
                )

            def _check(self, optimizer):
                self.steps += 1
                if not stun.masks:
                    return
                self.masked_steps += 1
                for param, mask in iter_masked(stun.target(mod), stun.masks):
                    tensors = [param] + [
                        v
                        for v in optimizer.state.get(param, {}).values()
                        if torch.is_tensor(v) and v.shape == param.shape
                    ]
                    self.violations += sum(int(local_view(t.detach())[~mask].abs().sum() > 0) for t in tensors)

            def on_train_end(self, trainer, pl_module):
                model, opt = stun.target(mod), trainer.optimizers[0]
                if mod.teacher is not None:  # gathered teacher weights were freed after its last forward
                    self.teacher["resharded"] = all(is_sharded(p) for p in mod.teacher.parameters())
                shards = []
                for layer in moe_layers(model):
                    for name in ("gate_up_proj", "down_proj"):
                        p = getattr(layer.experts, name)
                        state = opt.state[p]
                        shards.append(
                            {
                                "key": f"{layer.index}.{name}",
                                "sharded": is_sharded(p),
                                "local": local_view(p.detach()).cpu(),
                                "mask": stun.masks.local(layer.index, name, p, layer.adapter.transposed).cpu(),
                                "exp_avg": local_view(state["exp_avg"]).cpu(),
                                "exp_avg_sq": local_view(state["exp_avg_sq"]).cpu(),
                            }
                        )
                self.end = {
                    "kept": dict(stun.kept_experts),
                    "masks": {k: v.cpu() for k, v in stun.masks.masks.items()},
                    "shards": shards,
                    "full": {
                        k: full(v.detach()).cpu() for k, v in model.state_dict().items()
                    },  # every rank, same order
                    "step": trainer.global_step,
                    "report_sparsity": stun.report.within_expert_sparsity,
                    "losses": {k: float(v) for k, v in mod.last_losses.items()},
                    "lambda": float(mod.expert_lambda),
                }

        return _Probe()


def one_fit(device, out_dir, *, max_steps, ckpt_path=None, set_ckpt_path=False):
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from stun_lightning.callbacks import (
        FSDP2Strategy,
        SparsitySchedule,
        StunCallback,
        StunDataModule,
        StunDistillModule,
    )

    dm = StunDataModule(seq_len=32, batch_size=2, max_train_blocks=16, max_val_blocks=2, seed=0)
    mod = StunDistillModule("tiny:mixtral", teacher="copy", teacher_dtype=None, logit_kl_weight=0.1, lr=1e-2, seed=0)
    stun = StunCallback(
        StunRecipe(**RECIPE),
        SparsitySchedule("cubic", end_step=4),
        update_every=2,
        calibration=calibration_ids(),
        save_dir=os.path.join(out_dir, "model" if ckpt_path is None else f"model_resumed{int(set_ckpt_path)}"),
    )
    probe = Probe.make(stun, mod)
    ckpt = ModelCheckpoint(
        dirpath=os.path.join(out_dir, "ckpt"), filename="{step}", every_n_train_steps=2, save_top_k=-1
    )
    trainer = Trainer(
        accelerator=device,
        devices=WORLD,
        strategy=FSDP2Strategy(),
        precision="bf16-mixed",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=out_dir,
        callbacks=[stun, probe, ckpt],
    )
    if set_ckpt_path:  # known at setup: the expert sets are replayed from the checkpoint, not chosen again
        trainer.ckpt_path, ckpt_path = ckpt_path, None
    trainer.fit(mod, dm, ckpt_path=ckpt_path)
    return {
        "start": probe.start,
        "end": probe.end,
        "steps": probe.steps,
        "masked_steps": probe.masked_steps,
        "violations": probe.violations,
        "teacher": probe.teacher,
    }


def meta_init_fit(device):
    """A student built on the meta device: sharded, then given storage and initialised, then trained."""
    from lightning.pytorch import Trainer

    from stun_lightning.callbacks import FSDP2Strategy, StunDataModule, StunDistillModule
    from stun_lightning.sharding import has_meta, is_sharded, local_view

    with torch.device("meta"):
        student = build_tiny_model("qwen3_moe", seed=0)
    mod = StunDistillModule(student, teacher=None, lr=1e-2)
    trainer = Trainer(
        accelerator=device,
        devices=WORLD,
        strategy=FSDP2Strategy(),
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(mod, StunDataModule(seq_len=32, batch_size=2, max_train_blocks=4, max_val_blocks=2, seed=0))
    params = list(mod.student.parameters())
    return {
        "meta": has_meta(mod.student),
        "sharded": is_sharded(mod.student),
        "finite": all(bool(torch.isfinite(local_view(p)).all()) for p in params),
        "loss": float(mod.last_losses["total"]),
        "inv_freq": mod.student.model.rotary_emb.inv_freq.cpu(),
    }


def worker(rank: int, port: int, out_dir: str, device: str) -> None:
    set_rank_env(rank, port, WORLD)
    with rank_failures_recorded(out_dir, rank):
        if device == "cuda":
            torch.cuda.set_device(rank)
        # Lightning finds this process group and LOCAL_RANK / WORLD_SIZE: it launches nothing
        dist.init_process_group(
            "nccl" if device == "cuda" else "gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
        )
        first = one_fit(device, out_dir, max_steps=4)
        ckpt = Path(out_dir) / "ckpt" / f"{RESUME_FROM}.ckpt"
        resumed = one_fit(device, out_dir, max_steps=6, ckpt_path=str(ckpt), set_ckpt_path=True)
        again = one_fit(device, out_dir, max_steps=5, ckpt_path=str(ckpt))  # chosen again, checked before loading
        meta = meta_init_fit(device)
        torch.save(
            {"first": first, "resumed": resumed, "again": again, "meta": meta, "ckpt": str(ckpt)},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
