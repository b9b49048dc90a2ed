"""What StunCallback costs during trainer.fit, and the memory of teacher + student.

    python -m benchmarks.fit_overhead --device cuda            # OLMoE-shaped stack, 4 layers
    python -m benchmarks.fit_overhead --device cpu --quick     # tiny shapes, a CPU smoke test

Three fits of the same randomly initialised MoE stack (real layer sizes, fewer layers), bf16-mixed,
AdamW, random tokens, in one process:

* ``baseline``: the experts the callback would remove are removed up front and the final masks
  applied once; a plain fit, no callback.
* ``callback``: the dense model with StunCallback (structured phase at setup, cubic schedule,
  Wanda masks recomputed every ``--update-every`` steps from hooks on the training batches).
  Its steps are split into mask-update steps, statistics-window steps and the others; the
  callback's cost is the others' median against the baseline's median.
* ``distill``: StunDistillModule with a bf16 teacher copy on the same GPU, plus the callback:
  tokens/s and peak memory.

Prints one markdown table; ``--json`` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, Dataset

from benchmarks.step_timer import StepTimer
from stun_lightning.callbacks import SparsitySchedule, StunCallback, StunDistillModule
from stun_lightning.expert_masks import apply_masks
from stun_lightning.recipe import StunRecipe
from stun_lightning.unstructured import compute_masks
from stun_lightning.structured import apply_expert_sets, select_experts
from stun_lightning.tiny import build_tiny_model


class RandomTokens(Dataset):
    def __init__(self, n: int, seq: int, vocab: int):
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


def model_for(args):
    return build_tiny_model(
        "olmoe",
        hidden_size=args.hidden,
        intermediate_size=args.inter,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128 if args.hidden >= 128 else 4,
        num_key_value_heads=args.hidden // 128 if args.hidden >= 128 else 2,
        vocab_size=args.vocab,
        attn_implementation="sdpa",
    )


def fit(args, module, callbacks, sync):
    timer = StepTimer(sync)
    trainer = Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        precision=args.precision,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[*callbacks, timer],
    )
    data = DataLoader(RandomTokens(args.steps * args.batch, args.seq, args.vocab), batch_size=args.batch)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.fit(module, data)
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    return timer.times[args.warmup :], wall, peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=1024)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--update-every", type=int, default=10)
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--json", type=str, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.inter, args.experts, args.top_k, args.vocab = 2, 64, 32, 8, 2, 8192
        args.seq, args.batch, args.steps, args.update_every = 32, 2, 12, 4
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    recipe = StunRecipe(
        expert_sparsity=0.25, layer_budget="uniform", sparsity=0.5, metric="wanda", low_token_rule="magnitude"
    )
    schedule = SparsitySchedule("cubic", end_step=args.steps - args.update_every, update_every=args.update_every)
    tokens_per_step = args.batch * args.seq
    rows, out = [], {"args": vars(args), "torch": torch.__version__}
    if args.device == "cuda":
        out["gpu"] = torch.cuda.get_device_name()

    # baseline: same pruned shapes and final masks, no callback
    module = StunDistillModule(model_for(args), teacher=None, lr=1e-5)
    apply_expert_sets(module.student, select_experts(module.student, recipe))
    apply_masks(module.student, compute_masks(module.student, 0.5, StunRecipe(metric="magnitude")).masks)
    times, wall, peak = fit(args, module, [], sync)
    base = statistics.median(t for _, t in times)
    rows.append(("baseline (pruned up front, no callback)", base, "", tokens_per_step / base, peak))
    out["baseline"] = {"median_s": base, "wall_s": wall, "peak_gib": peak}
    del module

    # callback: structured phase at setup, progressive Wanda masks
    stun = StunCallback(recipe, schedule, stats_steps=1)
    module = StunDistillModule(model_for(args), teacher=None, lr=1e-5)
    times, wall, peak = fit(args, module, [stun], sync)
    updates = set(schedule.resolved(0.5, schedule.end_step).update_steps())
    kinds = {"update": [], "stats": [], "other": []}
    for step, t in times:
        if step + 1 in updates:
            kinds["update"].append(t)
        elif step + 2 in updates:  # stats_steps=1: the batch before the update step's
            kinds["stats"].append(t)
        else:
            kinds["other"].append(t)
    other = statistics.median(kinds["other"])
    rows.append(("callback: ordinary steps", other, f"{(other / base - 1) * 100:+.1f}%", tokens_per_step / other, peak))
    for kind in ("stats", "update"):
        if kinds[kind]:
            m = statistics.median(kinds[kind])
            rows.append(
                (
                    f"callback: {kind} steps ({len(kinds[kind])})",
                    m,
                    f"{(m / base - 1) * 100:+.1f}%",
                    tokens_per_step / m,
                    "",
                )
            )
    out["callback"] = {k: v for k, v in kinds.items()} | {
        "wall_s": wall,
        "peak_gib": peak,
        "final_sparsity": stun.current_sparsity,
    }
    del module, stun

    # distillation: bf16 teacher copy + student + callback
    stun = StunCallback(recipe, schedule, stats_steps=1)
    module = StunDistillModule(
        model_for(args), teacher="copy", teacher_dtype="bfloat16", lr=1e-5, lambda_init_step=schedule.end_step
    )
    times, wall, peak = fit(args, module, [stun], sync)
    med = statistics.median(t for _, t in times)
    rows.append(
        (
            "distill: teacher (bf16) + student + callback",
            med,
            f"{(med / base - 1) * 100:+.1f}%",
            tokens_per_step / med,
            peak,
        )
    )
    out["distill"] = {"median_s": med, "wall_s": wall, "peak_gib": peak}

    print(
        f"\n{out.get('gpu', 'cpu')}, torch {torch.__version__}; {args.layers} layers, hidden {args.hidden}, {args.experts} experts x {args.inter}, top-{args.top_k}; "
        f"{args.batch} x {args.seq} tokens per step, {args.precision}, AdamW; 25% experts removed, 50% Wanda inside\n"
    )
    print("| run | median step (s) | vs baseline | tokens/s | peak GPU memory (GiB) |")
    print("|---|---|---|---|---|")
    for name, t, rel, tps, peak in rows:
        peak_s = f"{peak:.1f}" if isinstance(peak, float) and peak == peak else ""
        print(f"| {name} | {t:.4f} | {rel} | {tps:,.0f} | {peak_s} |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
