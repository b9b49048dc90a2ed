"""Recovery after aggressive pruning, measured: every ``StunDistillModule(loss=...)`` option side by side.

For a reference model: prune at 50% and 70% of the expert weights in total with the default recipe
(``StunRecipe.default()``: the ``auto`` split between removed experts and OWL+Wanda inside the
survivors) and with 2:4 inside the survivors (25% of the experts by routing frequency + 2:4, about
62% total); then fit a fixed budget of
``--steps`` x ``--batch`` x ``--seq-len`` tokens with each recovery option (``ce`` = the CE-only
control, ``logit_kd``, ``expert_kd``, ``block_kd``, ``router_kd``; ``OPTION+logit_kd`` adds the logit KL
term at weight 1 to an option), masks held fixed, on the train mix
the reference models were trained on (``--train mix``: ``benchmarks.train_reference.DOMAINS``'s train
files of the data folder, disjoint from the held-out splits; ``shipped``: the package's 50k-token
calibration text, which 400 steps of 16 x 256 tokens repeat ~30 times, so CE overfits it). Reported per
row: held-out perplexity per domain before and after, the share of the gap to dense recovered
(``(ppl_pruned - ppl_after) / (ppl_pruned - ppl_dense)`` on the geometric mean over domains),
training tokens/s and peak GPU memory of the fit.

    python -m benchmarks.recovery --quick --data DIR            # shipped model, CPU, a few minutes
    python -m benchmarks.recovery --model out/reference/qwen3_moe_32x4/model --data DIR --device cuda --steps 1000
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch

from benchmarks.data_folder import add_data_argument, require_data
from benchmarks.quality import evaluate, heldout_ids, load_model, model_name
from benchmarks.train_reference import DOMAINS
from stun_lightning import StunRecipe, prune
from stun_lightning.recipe import DEFAULT_RECIPE
from stun_lightning.data import calibration_blocks
from stun_lightning.distill import RECOVERY_LOSSES, kept_from_removed
from stun_lightning.expert_masks import masks_from_zeros, measured_sparsity
from stun_lightning.tiny import load_tokenizer

DEFAULT = {k: v for k, v in DEFAULT_RECIPE.items() if not k.startswith("calibration_")}
RECIPES = {  # the default recipe (the auto split) at two totals, and 25% of the experts + 2:4
    "50% total": dict(DEFAULT, total_sparsity=0.5),
    "70% total": dict(DEFAULT, total_sparsity=0.7),
    "2:4": dict(
        expert_sparsity=0.25,
        expert_method="frequency",
        layer_budget="uniform",
        metric="wanda",
        pattern="2:4",
        sparsity=0.5,
    ),
}


def train_data(args, data: Path):
    """The fits' training blocks, tokenized once (``--train``): no validation or calibration split is cut."""
    from stun_lightning.callbacks import StunDataModule

    files = None if args.train == "shipped" else [str(data / f) for files, _ in DOMAINS.values() for f in files]
    module = StunDataModule(
        train=files,
        tokenizer=None if args.model == "shipped" else args.model,
        seq_len=args.seq_len,
        batch_size=args.batch,
        val_fraction=0.0,
        calibration_fraction=0.0,
        seed=0,
    )
    module.setup("fit")
    return module


#: a row ``OPTION+logit_kd`` adds the logit KL term at this weight to ``OPTION`` (``logit_kl_weight``)
COMBINED_LOGIT_KL_WEIGHT = 1.0


def parse_loss(row: str) -> tuple[str, float] | None:
    """``(StunDistillModule loss, logit_kl_weight)`` of a ``--losses`` entry: an option of
    ``RECOVERY_LOSSES``, or ``OPTION+logit_kd`` (that option with the logit KL term added); None if neither."""
    loss, plus, extra = row.partition("+")
    if loss not in RECOVERY_LOSSES or (plus and (extra != "logit_kd" or loss == "logit_kd")):
        return None
    return loss, COMBINED_LOGIT_KL_WEIGHT if plus else 0.0


def fit(dense, student, report, loss: tuple[str, float], data, args) -> dict:
    """One recovery fit of ``student`` (in place) with its masks fixed; tokens/s and peak GPU memory."""
    from lightning.pytorch import Trainer, seed_everything

    from stun_lightning.callbacks import FixedMasks, StunDistillModule

    masks = masks_from_zeros(student)
    loss, logit_kl_weight = loss
    seed_everything(0, verbose=False)
    module = StunDistillModule(
        student=student,
        teacher=copy.deepcopy(dense),
        expert_map=kept_from_removed(dense, report.removed_experts),
        teacher_dtype="bfloat16" if args.device.type == "cuda" else None,
        loss=loss,
        logit_kl_weight=logit_kl_weight,
        lr=args.lr,
        warmup_steps=max(1, args.steps // 10),
        min_lr_ratio=0.1,
    )
    trainer = Trainer(
        accelerator="gpu" if args.device.type == "cuda" else "cpu",
        devices=1,
        max_steps=args.steps,
        limit_val_batches=0,
        precision="bf16-mixed" if args.device.type == "cuda" else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[FixedMasks(masks)],
    )
    if args.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.enable_grad():
        trainer.fit(module, data)
    seconds = time.perf_counter() - start
    student.to(args.device).eval()  # Lightning's teardown leaves it on the CPU
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if args.device.type == "cuda" else "-"
    return {
        "tokens_per_s": trainer.global_step * args.batch * args.seq_len / seconds,
        "peak_gib": peak,
        "seconds": seconds,
    }


def geomean(ppl: dict[str, float]) -> float:
    return math.exp(sum(math.log(v) for v in ppl.values()) / len(ppl))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recovery", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shipped", help="a reference model directory, or 'shipped' (default)")
    add_data_argument(parser, "the held-out splits")
    parser.add_argument("--device", default="cpu", type=torch.device)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument(
        "--train",
        choices=("mix", "shipped"),
        default="mix",
        help="fit on the train mix of --data (default) or the package's shipped calibration text",
    )
    parser.add_argument(
        "--losses",
        default=",".join(RECOVERY_LOSSES),
        help="comma-separated recovery options; OPTION+logit_kd adds the logit KL term to OPTION",
    )
    parser.add_argument(
        "--recipes", default=",".join(RECIPES), help="comma-separated: " + ", ".join(RECIPES).replace("%", "%%")
    )
    parser.add_argument("--heldout-tokens", type=int, default=None, help="first tokens of each held-out split")
    parser.add_argument(
        "--quick", action="store_true", help="CPU smoke size: 30 steps of 4 x 64 tokens, 8k held-out tokens per domain"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    args = parser.parse_args(argv)
    losses = {row: parse_loss(row) for row in args.losses.split(",")}
    recipes = args.recipes.split(",")
    bad = [x for x, parsed in losses.items() if parsed is None] + [x for x in recipes if x not in RECIPES]
    if bad:
        print(
            f"error: unknown {bad}; --losses from {', '.join(RECOVERY_LOSSES)} (or OPTION+logit_kd), "
            f"--recipes from {', '.join(RECIPES)}",
            file=sys.stderr,
        )
        raise SystemExit(2)
    if args.quick:
        args.steps, args.batch, args.seq_len, args.heldout_tokens = 30, 4, 64, args.heldout_tokens or 8192
    data = require_data(args.data, "held-out perplexity per domain")
    tokenizer = load_tokenizer(None if args.model == "shipped" else args.model)
    heldout = heldout_ids(tokenizer, "data", data, args.heldout_tokens)
    dense = load_model(args.model, args.device)
    calibration = calibration_blocks(tokenizer, None, 64 if args.quick else 128, 256, seed=0)
    dense_ppl, _ = evaluate(dense, heldout, 256, 8, args.device)
    training = train_data(args, data)
    domains = list(dense_ppl)
    lines = [
        f"# Recovery after pruning: {model_name(args.model)}, {args.steps} steps x {args.batch} x {args.seq_len} tokens, lr {args.lr}, device {args.device}",
        "",
        f"Training text: {args.train} ({training.train_blocks.numel():,} tokens)",
        "",
        f"Command: `python -m benchmarks.recovery {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        f"Dense: {' / '.join(f'{d} {dense_ppl[d]:.2f}' for d in domains)}, mean {geomean(dense_ppl):.2f}",
        "",
        f"| recipe | sparsity | loss | ppl before ({'/'.join(domains)}) | ppl after | mean before -> after | gap recovered | tokens/s | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)  # rows follow as they finish: a run cut by a time limit keeps them
    for name in recipes:
        pruned = copy.deepcopy(dense)
        report = prune(
            pruned,
            StunRecipe(
                **RECIPES[name],
                low_token_rule="magnitude",
                calibration_samples=len(calibration),
                calibration_seq_len=256,
            ),
            calibration=calibration,
            device=args.device,
            progress=False,
        )
        before, _ = evaluate(pruned, heldout, 256, 8, args.device)
        sparsity = report.expert_param_sparsity
        for loss, parsed in losses.items():
            student = copy.deepcopy(pruned)
            stats = fit(dense, student, report, parsed, training, args)
            if abs(measured_sparsity(student) - measured_sparsity(pruned)) > 1e-9:
                raise RuntimeError(f"masks moved during the {loss} fit")
            after, _ = evaluate(student, heldout, 256, 8, args.device)
            b, a, d = geomean(before), geomean(after), geomean(dense_ppl)
            recovered = (b - a) / (b - d) if b > d else float("nan")
            lines.append(
                f"| {name} | {sparsity:.1%} | {loss} | {' / '.join(f'{before[x]:.2f}' for x in domains)} | {' / '.join(f'{after[x]:.2f}' for x in domains)} "
                f"| {b:.2f} -> {a:.2f} | {recovered:.0%} | {stats['tokens_per_s']:.0f} | {stats['peak_gib']} |"
            )
            print(lines[-1], flush=True)
            del student
    if args.out is not None:
        text = "\n".join(lines) + "\n"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)


if __name__ == "__main__":
    main()
