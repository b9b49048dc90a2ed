"""What each pruning method costs: held-out perplexity per domain of pruned reference models.

One table per model (markdown + CSV), the dense model in the same run. Rows:

* dense;
* unstructured only, 50% inside every expert: magnitude, Wanda, OWL+Wanda, MoE-Pruner; and 2:4;
* expert pruning only, 12.5 / 25 / 50% of the experts: STUN (router distances, one global
  threshold), router-weighted frequency, random (mean of 3 seeds);
* STUN's claim: at total expert-parameter sparsity 40-80%, expert pruning (STUN, ``--stun-experts``
  of the experts, 25% by default as the paper's ~20% for 40% total) then OWL+Wanda or the MoE-Pruner
  metric inside the survivors (``total_sparsity=``), against the same unstructured method alone at
  the same total; STUN then 2:4;
* ``--investigate``: at 60-80% total, STUN with a per-layer budget, co-activation distances, other
  expert fractions, and frequency-based expert pruning in STUN's place;
* every expert method (issue 11: stun, frequency, random, reap, naee, eep, uncurl), all with
  ``layer_budget="uniform"`` (the same count in every layer: the last four only support that), at
  25% and 50% of the experts, alone and then OWL+Wanda to a fixed 70% total (``METHODS_TOTAL``).
  NAEE enumerates on ``NAEE_TOKENS`` calibration tokens per layer; EEP is capped at
  ``EEP_EVALUATIONS`` fitness evaluations (held-out loss of the first ``EEP_FITNESS_WINDOWS``
  calibration windows), far below the official 400: a budget-limited EEP, not the paper's;
* task-specific (math): stun, reap, uncurl and frequency at 50% of the experts, calibrated on GSM8K
  train only (``gsm8k/train.jsonl`` of ``--data``; without it, the GSM8K lines of the shipped
  calibration text), perplexity on every domain, to set against the same methods on the mixed
  calibration in the rows above;
* expert-wise distillation (issue 10) of the STUN rows at 50% and 70% total (25% of the experts +
  OWL+Wanda): ``StunDistillModule`` with the dense model as teacher, the pruned copy as student,
  its masks held fixed (gradients and weights re-masked at every step), ``--distill-steps`` steps of
  ``--distill-batch`` x 128 tokens of the shipped calibration text (a slice of the train mix),
  perplexity before and after and the share of the gap to dense recovered; a CE-only fine-tune of
  the same steps (no teacher) as a control.

* issue 22 (``--only auto``): at 50 / 70 / 80% total, Wanda and OWL+Wanda alone, STUN's recipe (25%
  of the experts + OWL+Wanda), frequency 25% with the uniform and the ``error_curve`` layer budget and
  with ``router_weighted`` merging, and ``expert_sparsity="auto"`` by block error (frequency and
  REAP removal orders; Wanda and OWL+Wanda inside the survivors) and by the pruned model's held-out
  loss (``auto (model_loss, split_groups=4)``, refined over 4 groups of layers, and ``=1``, uniform
  only), summarised in one table per model.

Under each model's main table: the dense model's mean pairwise cosine similarity of expert weights, per layer
and averaged over layers (``stun_lightning.methods.stun.expert_weight_cosine``): STUN merges experts
whose router rows are close, which is safe where experts are near-copies (upcycled, high cosine)
and not where they are unrelated (trained from scratch, near 0). ``--cosine-only`` prints just that.

``--only`` runs a subset of these families (``base``, ``methods``, ``task``, ``distill``, ``auto``; the dense row
always runs); ``--methods`` keeps only the rows whose method label contains one of its texts.

Perplexity is measured on disjoint windows of 256 tokens (as ``stun_lightning.evaluate``) of the
held-out splits: prose = WikiText-2 test, math = GSM8K test, code = Python stdlib test (or the
shipped mixed held-out text with ``--heldout shipped``). "mean" is the geometric mean over domains.
Calibration: windows of the shipped calibration text (a slice of the train mix). Experts that get no
calibration token are pruned by magnitude (``low_token_rule="magnitude"``) so that every row reaches
its nominal sparsity; the official STUN code leaves them dense, which would flatter whichever row
keeps more of them (our first, unbalanced models had dead experts: unstructured-only rows then
stayed ~3 points under their target).

    python -m benchmarks.quality --quick --data DIR                  # shipped model, CPU, 75 rows in ~6-10 minutes on 2 cores
    python -m benchmarks.quality --quick --data DIR --only methods,task,distill   # the issue 10 / 11 rows only
    python -m benchmarks.quality --model out/reference/qwen3_moe_32x4/model --cache out/data/tokens.pt --device cuda --investigate
    python -m benchmarks.quality --quick --heldout shipped       # no data folder: the shipped mixed held-out text
"""

from __future__ import annotations

import argparse
import copy
import re
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from benchmarks.data_folder import add_data_argument, require_data
from benchmarks.heldout import evaluate, heldout_ids
from benchmarks.quality_distill import distill
from benchmarks.quality_rows import EEP_FITNESS_WINDOWS, FAMILIES, Result, Row, build_rows
from benchmarks.quality_tables import cosine_text, report_text, write_csv
from stun_lightning import StunRecipe, prune
from stun_lightning.adapters import moe_layers
from stun_lightning.data import calibration_blocks, calibration_path, read_texts
from stun_lightning.methods.stun import expert_weight_cosine
from stun_lightning.reference import load_reference_model
from stun_lightning.tiny import load_tokenizer


# ---------------------------------------------------------------- runs


def math_calibration(tokenizer, data: Path | None, n_samples: int, seq_len: int) -> tuple[torch.Tensor, str]:
    """Calibration windows of math text only: GSM8K train, or the GSM8K lines of the shipped calibration text."""
    gsm8k = data / "gsm8k" / "train.jsonl" if data is not None else None
    if gsm8k is not None and gsm8k.exists():
        return calibration_blocks(tokenizer, gsm8k, n_samples, seq_len, seed=0), str(gsm8k)
    # GSM8K answers carry calculator annotations (<<48/2=24>>) and a final "#### n": prose and code lines do not.
    lines = [line for line in read_texts(calibration_path())[0].splitlines() if "<<" in line or line.startswith("####")]
    return calibration_blocks(
        tokenizer, None, n_samples, seq_len, seed=0, texts=["\n".join(lines)]
    ), "GSM8K lines of the shipped calibration text"


def run_row(dense, row: Row, calibrations: dict[str, torch.Tensor], heldout, args) -> Result:
    start = time.perf_counter()
    if row.recipe is None:
        ppl, acc = evaluate(dense, heldout, args.seq_len, args.batch_size, args.device)
        return Result(row, ppl, acc, 0.0, 0.0, 0.0, "-", time.perf_counter() - start)
    calibration = calibrations[row.calibration]
    fields = dict(row.recipe)
    if (
        fields.get("expert_method") == "eep"
    ):  # fitness: LM loss of a few calibration windows (EEP's default is all of them)
        fields["method_options"] = {**fields["method_options"], "fitness_ids": calibration[:EEP_FITNESS_WINDOWS]}
    ppls, accs, reports, extra = [], [], [], {}
    for seed in row.seeds:
        model = copy.deepcopy(dense)
        recipe = StunRecipe(
            **fields,
            seed=seed,
            low_token_rule="magnitude",
            calibration_samples=len(calibration),
            calibration_seq_len=calibration.shape[1],
            batch_size=args.calib_batch,
        )
        reports.append(prune(model, recipe, calibration=calibration, device=args.device, progress=False))
        if row.distill is not None:
            before, before_acc = evaluate(model, heldout, args.seq_len, args.batch_size, args.device)
            extra = {
                "before": before,
                "before_acc": before_acc,
                **distill(dense, model, reports[-1], args, teacher=row.distill == "kd"),
            }
        p, a = evaluate(model, heldout, args.seq_len, args.batch_size, args.device)
        ppls.append(p)
        accs.append(a)
        del model
    ppl = {d: sum(p[d] for p in ppls) / len(ppls) for d in ppls[0]}
    r = reports[0]
    removed = 1 - sum(r.experts_after.values()) / sum(r.experts_before.values())
    counts = sorted({tuple(rep.experts_after.values()) for rep in reports})
    after = " / ".join(" ".join(map(str, c)) for c in counts) if removed else "all"
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return Result(
        row,
        ppl,
        mean(accs),
        removed,
        mean([rep.expert_param_sparsity for rep in reports]),
        mean([rep.within_expert_sparsity for rep in reports]),
        after,
        time.perf_counter() - start,
        extra,
    )


def expert_cosines(model) -> dict[int, float]:
    """Mean pairwise cosine similarity of the experts' weights, per MoE layer (STUN's premise: near-copies)."""
    return {layer.index: expert_weight_cosine(layer) for layer in moe_layers(model)}


def load_model(spec: str, device):
    if spec == "shipped":
        model, _ = load_reference_model(device=device)
        return model
    return AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32).to(device).eval()


def model_name(spec: str) -> str:
    if spec == "shipped":
        return "shipped"
    return Path(spec).resolve().name if Path(spec).name != "model" else Path(spec).resolve().parent.name


def method_filters(text: str) -> list[str]:
    """``--methods`` texts: split at the commas outside parentheses, so that a row label such as
    ``auto (model_loss, split_groups=4)`` can be given whole."""
    return [t.strip() for t in re.split(r",(?![^(]*\))", text) if t.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", action="append", help="model folder (save_pretrained) or 'shipped'; repeatable (default: shipped)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="CPU-sized: 64 calibration windows, 8192 held-out tokens per domain"
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    add_data_argument(
        parser,
        "the held-out splits (unless --cache or --heldout shipped); GSM8K train for the task rows (else the shipped text's GSM8K lines)",
    )
    parser.add_argument("--cache", type=Path, default=None, help="train_reference.py's token cache, instead of --data")
    parser.add_argument("--heldout", choices=("domains", "shipped"), default="domains")
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="held-out tokens per domain (default: all; --quick: 8192)"
    )
    parser.add_argument(
        "--calib-samples", type=int, default=None, help="calibration windows (default 128; --quick: 64)"
    )
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument(
        "--batch-size", type=int, default=None, help="evaluation windows per forward (default 64 on GPU, 8 on CPU)"
    )
    parser.add_argument("--calib-batch", type=int, default=16)
    parser.add_argument(
        "--stun-experts",
        type=float,
        default=0.25,
        help="fraction of experts STUN removes before the unstructured phase",
    )
    parser.add_argument("--investigate", action="store_true")
    parser.add_argument(
        "--only",
        default=",".join(FAMILIES),
        help=f"comma-separated row families among {','.join(FAMILIES)} (the dense row always runs)",
    )
    parser.add_argument(
        "--distill-steps",
        type=int,
        default=None,
        help="optimizer steps of each distillation fit (default 300; --quick: 60)",
    )
    parser.add_argument("--distill-batch", type=int, default=8, help="windows of 128 tokens per distillation step")
    parser.add_argument(
        "--distill-lr",
        type=float,
        default=2e-4,
        help="peak AdamW lr of the distillation fits (warm-up 10%%, cosine to 10%%)",
    )
    parser.add_argument("--out", type=Path, default=Path("out/quality"))
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated texts: only the rows whose method contains one of them (the dense row always runs)",
    )
    parser.add_argument(
        "--cosine-only",
        action="store_true",
        help="print each model's expert weight cosine and stop (no rows, no data folder)",
    )
    args = parser.parse_args(argv)
    families = tuple(f.strip() for f in args.only.split(",") if f.strip())
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        parser.error(f"--only: unknown families {unknown}; choose among {list(FAMILIES)}")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.batch_size = args.batch_size or (64 if args.device.type == "cuda" else 8)
    args.distill_steps = args.distill_steps or (60 if args.quick else 300)
    max_tokens = args.max_tokens if args.max_tokens is not None else (8192 if args.quick else None)
    n_calib = args.calib_samples or (64 if args.quick else 128)
    torch.set_grad_enabled(False)

    if args.cosine_only:
        for spec in args.model or ["shipped"]:
            print(f"{model_name(spec)}: " + cosine_text(expert_cosines(load_model(spec, args.device))), flush=True)
        return
    if args.heldout == "domains" and args.cache is None:
        require_data(args.data, "--heldout domains (the default; or pass --cache FILE or --heldout shipped)")
    tokenizer = load_tokenizer()
    heldout = heldout_ids(tokenizer, args.heldout, args.data, max_tokens, args.cache)
    calibrations = {"mixed": calibration_blocks(tokenizer, None, n_calib, args.seq_len, seed=0)}
    math_source = "-"
    if "task" in families:
        calibrations["math"], math_source = math_calibration(tokenizer, args.data, n_calib, args.seq_len)
    rows = build_rows(args.stun_experts, args.investigate, families)
    if args.methods:
        wanted = method_filters(args.methods)
        rows = [r for r in rows if r.recipe is None or any(t in r.method for t in wanted)]
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if set(families) == set(FAMILIES) else "_" + "_".join(families)
    for spec in args.model or ["shipped"]:
        name = model_name(spec)
        dense = load_model(spec, args.device)
        cosines = expert_cosines(dense)
        title = (
            f"{name}: {sum(p.numel() for p in dense.parameters()) / 1e6:.1f} M parameters, held-out {args.heldout} "
            f"({', '.join(f'{d} {len(t)}' for d, t in heldout.items())} tokens), {n_calib} x {args.seq_len} calibration tokens, {args.device.type}"
        )
        if "task" in families:
            title += f"; math calibration: {math_source}"
        if "distill" in families:
            title += f"; distillation: {args.distill_steps} steps of {args.distill_batch} x 128 tokens, lr {args.distill_lr:g}"
        results, start = [], time.perf_counter()
        for row in rows:
            results.append(run_row(dense, row, calibrations, heldout, args))
            r = results[-1]
            print(
                f"[{name} {time.perf_counter() - start:5.0f}s] {row.group:<18} {row.method:<42} total {r.total_sparsity:6.1%} ppl "
                + " ".join(f"{d} {p:8.2f}" for d, p in r.ppl.items())
                + f"  acc {r.accuracy:.3f}  ({r.seconds:.0f}s)",
                flush=True,
            )
            # Written after every row, so a run stopped at a time limit keeps what it measured.
            text = report_text(results, title, args.stun_experts, cosines)
            (args.out / f"quality_{name}{suffix}.md").write_text(text)
            write_csv(results, args.out / f"quality_{name}{suffix}.csv", name)
        print("\n" + text, flush=True)
        print(
            f"{name}: {len(rows)} rows in {time.perf_counter() - start:.0f}s; wrote {args.out}/quality_{name}{suffix}.md and .csv",
            flush=True,
        )


if __name__ == "__main__":
    main()
