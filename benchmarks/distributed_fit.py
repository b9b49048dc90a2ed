"""StunCallback + expert-wise distillation of a MoE too large for one GPU, sharded over N GPUs (FSDP2).

    python -m benchmarks.distributed_fit --devices 2 --layers 16 --batch-size 2 --steps 8 --resume-steps 6 --out benchmarks/results/distributed_fit_h200x2.md
    python -m benchmarks.distributed_fit --devices 2 --accelerator cpu --tiny      # a CPU smoke run (gloo)

One script, two fits, each through Lightning's own launcher (the script re-runs in every process):

1. throughput: a Qwen3-30B-A3B-shaped MoE (hidden 2048, 128 experts of FFN 768, top-8) with
   ``--layers`` decoder layers (16: 10.0B parameters, 7.6B after expert removal), random weights, built on the
   ``meta`` device; the structured phase removes 25% of each layer's experts before anything is
   allocated (``expert_method="random"``: with random weights any choice is as good, and STUN's
   choice reads router and expert weights, which a meta model does not have; a real run loads
   them), then ``FSDP2Strategy`` shards student and frozen teacher per decoder layer and each rank
   allocates and initialises only its shard. StunCallback ramps unstructured
   magnitude masks to 50% inside the surviving experts; bf16-mixed; AdamW. Reported: tokens/s
   (global, median step after ``--warmup`` steps; mask-update steps separately), peak GPU memory
   per rank, and the bytes one GPU would need for the same fit (the arithmetic behind "does not
   fit one GPU").
2. resume (``--resume-layers``, default 2 layers of the same shape): a fit with a sharded
   checkpoint at half way, then a second fit from it; the loss of every step after the checkpoint
   is compared with the uninterrupted run's, and the expert sets and masks with the first run's.

NVLink multicast stays off (``FSDP2Strategy`` sets ``NCCL_NVLS_ENABLE=0`` and
``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` for every process it starts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.step_timer import StepTimer


def qwen3_config(layers: int, tiny: bool):
    from transformers import Qwen3MoeConfig

    if tiny:
        return Qwen3MoeConfig(
            hidden_size=64,
            moe_intermediate_size=32,
            intermediate_size=128,
            num_experts=8,
            num_experts_per_tok=2,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=8192,
            max_position_embeddings=512,
            norm_topk_prob=True,
        )
    return Qwen3MoeConfig(
        hidden_size=2048,
        moe_intermediate_size=768,
        intermediate_size=6144,
        num_experts=128,
        num_experts_per_tok=8,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=8192,
        max_position_embeddings=4096,
        norm_topk_prob=True,
    )


def meta_model(config):
    """The whole model on ``meta``: no storage until FSDP2 has sharded it."""
    from transformers import AutoModelForCausalLM

    config._experts_implementation = "grouped_mm"
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


class FitRecorder(StepTimer):
    """Step times and losses; at the end rank 0 writes them, with every rank's peak memory, as JSON."""

    def __init__(self, out: str, tokens_per_step: int, update_every: int):
        super().__init__()
        self.out, self.tokens_per_step, self.update_every = out, tokens_per_step, update_every

    def on_train_end(self, trainer, pl_module):
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        peaks = trainer.strategy.all_gather(torch.tensor([peak], dtype=torch.float64, device=pl_module.device))
        if trainer.is_global_zero:
            Path(self.out).write_text(
                json.dumps(
                    {
                        "times": [t for _, t in self.times],
                        "losses": self.losses,
                        "tokens_per_step": self.tokens_per_step,
                        "update_every": self.update_every,
                        "peak_bytes": [float(p) for p in peaks.flatten().cpu()],
                        "world": trainer.world_size,
                        "global_step": trainer.global_step,
                    }
                )
            )


def run_fit(
    args,
    layers: int,
    steps: int,
    out_json: str,
    ckpt_dir: str | None = None,
    ckpt_every: int = 0,
    resume: str | None = None,
):
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    from stun_lightning import StunRecipe
    from stun_lightning.callbacks import FSDP2Strategy, StunCallback, StunDataModule, StunDistillModule
    from stun_lightning.schedule import SparsitySchedule

    seed_everything(0)
    student = meta_model(qwen3_config(layers, args.tiny))
    module = StunDistillModule(
        student=student, teacher="copy", lr=1e-4, warmup_steps=2, lambda_init_step=2, teacher_dtype="bfloat16"
    )
    # with a checkpoint, one epoch = ckpt_every steps: the checkpoint closes an epoch, so the resumed fit
    # reads the same (seed + epoch) shuffled blocks as the uninterrupted one (Lightning restarts a
    # partly read epoch from its start)
    blocks = args.batch_size * args.devices * (ckpt_every or steps)
    data = StunDataModule(seq_len=args.seq_len, batch_size=args.batch_size, max_train_blocks=blocks, max_val_blocks=2)
    update_every = max(2, steps // 4)
    recipe = StunRecipe(
        expert_method="random", expert_sparsity=0.25, layer_budget="uniform", sparsity=0.5, metric="magnitude"
    )
    callbacks = [
        StunCallback(
            recipe=recipe,
            schedule=SparsitySchedule(kind="cubic", start_step=0, end_step=steps // 2, update_every=update_every),
        ),
        FitRecorder(out_json, args.seq_len * args.batch_size * args.devices, update_every),
    ]
    if ckpt_dir:
        callbacks.append(
            ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=ckpt_every, save_top_k=-1)
        )
    trainer = Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=FSDP2Strategy(),
        precision=args.precision,
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=bool(ckpt_dir),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    masks = callbacks[0].masks
    return trainer, callbacks[0].kept_experts, masks


def param_count(config) -> tuple[int, int]:
    """(all parameters, expert parameters) of the model ``config`` describes (counted on meta)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return total, experts


def report(args, fit: dict, resume: dict | None) -> str:
    total, experts = param_count(qwen3_config(args.layers, args.tiny))
    student = total - experts // 4  # 25% of the experts removed
    gib = 2**30
    states = student * (4 + 4 + 8) + total * 2  # fp32 weights + grads + AdamW moments; bf16 teacher
    # what the sharded run held beyond its shard of the states: activations, gathered layers, masks
    extra = max(fit["peak_bytes"]) - states / fit["world"] if torch.cuda.is_available() else 0.0
    one_gpu = states + extra
    capacity = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else float("nan")
    steps = fit["times"]
    timed = [t for i, t in enumerate(steps) if i >= args.warmup and (i + 1) % fit["update_every"]]
    updates = [t for i, t in enumerate(steps) if i >= args.warmup and not (i + 1) % fit["update_every"]]
    med = statistics.median(timed) if timed else float("nan")
    lines = [
        f"# FSDP2 fit with StunCallback + expert-wise distillation, {fit['world']} x {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}",
        "",
        f"    python -m benchmarks.distributed_fit --devices {args.devices} --layers {args.layers} --batch-size {args.batch_size} "
        f"--steps {args.steps} --resume-steps {args.resume_steps}",
        "",
        f"torch {torch.__version__}; model: Qwen3-30B-A3B layer shapes x {args.layers} layers, vocab 8192: {total / 1e9:.2f}B parameters "
        f"({experts / 1e9:.2f}B in experts); student after removing 25% of the experts: {student / 1e9:.2f}B; teacher: the unpruned model in bf16. "
        f"Batch {args.batch_size} x {args.seq_len} tokens per rank, {args.precision}, AdamW.",
        "",
        "| GPUs | tokens/s (median step) | step s (median) | mask-update step s | peak GPU memory per rank (GiB) | steps |",
        "|---|---|---|---|---|---|",
        f"| {fit['world']} | {fit['tokens_per_step'] / med:,.0f} | {med:.3f} | {statistics.median(updates) if updates else float('nan'):.3f} | "
        f"{max(fit['peak_bytes']) / gib:.1f} | {fit['global_step']} |",
        "",
        f"One GPU would need {states / gib:,.0f} GiB for the states (student {student / 1e9:.2f}B x 16 bytes: fp32 weights, "
        f"gradients and two AdamW moments; teacher {total / 1e9:.2f}B x 2 bytes) plus the {extra / gib:,.0f} GiB this run held beyond "
        f"its 1/{fit['world']} of them (activations, gathered layers, local masks; they do not shrink with more GPUs): "
        f"{one_gpu / gib:,.0f} GiB against {capacity / gib:,.0f} GiB on this GPU: {'it cannot fit' if one_gpu > capacity else 'it would fit'}.",
        "",
        f"Loss per step: {', '.join(f'{v:.3f}' for v in fit['losses'])}",
    ]
    if resume is not None:
        a, b = resume["full"], resume["resumed"]
        k = resume["from_step"]
        diffs = [abs(x - y) for x, y in zip(a[k:], b)]
        lines += [
            "",
            f"## Resume from the sharded checkpoint at step {k} ({args.resume_layers} layers, same shapes)",
            "",
            "| step | uninterrupted loss | resumed loss |",
            "|---|---|---|",
        ]
        lines += [f"| {k + i + 1} | {x:.4f} | {y:.4f} |" for i, (x, y) in enumerate(zip(a[k:], b))]
        lines += [
            "",
            f"Largest loss difference after resuming: {max(diffs) if diffs else float('nan'):.2e}; expert sets equal: {resume['experts_equal']}; "
            f"masks equal: {resume['masks_equal']}; checkpoint files: {resume['files']}.",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--resume-layers", type=int, default=2)
    parser.add_argument("--resume-steps", type=int, default=6)
    parser.add_argument("--skip", choices=["fit", "resume"], default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument(
        "--workdir",
        default=os.environ.get("STUN_BENCH_DIR", os.path.join(tempfile.gettempdir(), "stun_distributed_fit")),
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.tiny:
        args.seq_len, args.batch_size = min(args.seq_len, 32), min(args.batch_size, 2)
        args.precision = "32-true" if args.accelerator == "cpu" else args.precision
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    fit = resume = None
    if args.skip != "fit":
        trainer, _, _ = run_fit(args, args.layers, args.steps, str(work / "fit.json"))
        if trainer.is_global_zero:  # rank 0 wrote it; the other ranks go on without reading
            fit = json.loads((work / "fit.json").read_text())
    if args.skip != "resume":
        k = args.resume_steps // 2
        ckpt = work / "ckpt"
        trainer, kept_a, masks_a = run_fit(
            args, args.resume_layers, args.resume_steps, str(work / "full.json"), str(ckpt), k
        )
        full = json.loads((work / "full.json").read_text()) if trainer.is_global_zero else None
        path = ckpt / f"step={k}.ckpt"
        trainer, kept_b, masks_b = run_fit(
            args, args.resume_layers, args.resume_steps, str(work / "resumed.json"), ckpt_every=k, resume=str(path)
        )
        if trainer.is_global_zero:
            resumed = json.loads((work / "resumed.json").read_text())
            files = sorted(p.name for p in path.iterdir()) if path.is_dir() else [path.name]
            resume = {
                "full": full["losses"],
                "resumed": resumed["losses"],
                "from_step": k,
                "files": ", ".join(files),
                "experts_equal": kept_a == kept_b,
                "masks_equal": masks_a.equal(masks_b),
            }
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return 0
    text = report(args, fit, resume) if fit is not None else json.dumps(resume, indent=1)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
