"""``stun-lightning``: prune and evaluate MoE models from the command line.

    stun-lightning prune                                   # the embedded default, ~1 min on a CPU
    stun-lightning prune --model PATH_OR_HUB_ID --recipe configs/X.yaml --calib FILE --out DIR
    stun-lightning eval --model DIR --data FILE
    stun-lightning eval --model DIR --tasks stun_gsm8k,stun_cloze [--baseline DENSE_DIR] [--limit N]
    stun-lightning report DIR                            # PNGs + report.html of what pruning did
    stun-lightning export --model DIR --format hf|sparse|aoti --out DIR
    stun-lightning fit --config configs/fit_X.yaml       # Lightning fine-tune (stun_lightning.callbacks)

Every input is checked before any work; output goes to a temporary directory renamed at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .cli_inputs import UsageError, default_device, load_model_and_tokenizer
from .cli_prune import DEFAULT_RECIPE, RECIPE_FLAGS, run_prune
from .recipe import StunRecipe, field_choices


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stun-lightning", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a MoE model (default: the embedded tiny model)")
    p.add_argument(
        "--model", help="saved model directory or Hugging Face hub id (default: the embedded trained reference MoE)"
    )
    p.add_argument("--tokenizer", help="tokenizer path or hub id (default: the model's, or the shipped one)")
    p.add_argument("--recipe", help="YAML recipe (see configs/); flags below override its fields")
    p.add_argument("--calib", help="calibration text: .txt, .jsonl or a directory (default: shipped mix)")
    p.add_argument("--eval-data", help="held-out text for perplexity (default: shipped held-out mix)")
    p.add_argument(
        "--eval-tokens", type=int, default=16384, help="tokens of held-out text to score (0 = skip perplexity)"
    )
    p.add_argument("--out", help="write the pruned model here (temp dir, renamed at the end)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--device", help="where calibration runs, one layer at a time (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="load the model in this dtype")
    choices = field_choices()
    for name, kind in RECIPE_FLAGS.items():
        flag, default = name.replace("_", "-"), DEFAULT_RECIPE.get(name, getattr(StunRecipe, name))
        allowed = choices.get(name) or (["unstructured", "N:M"] if name == "pattern" else None)
        text = f"recipe field {name}" + (", 0 < N < M (2:4 for the sparse kernels)" if name == "pattern" else "")
        text += " (a fraction, or auto: the split per layer for --total-sparsity)" if name == "expert_sparsity" else ""
        p.add_argument(
            f"--{flag}",
            type=kind,
            metavar="{" + ",".join(allowed) + "}" if allowed else None,
            help=f"{text}; without --recipe: {default}",
        )
    p.add_argument(
        "--stream",
        action="store_true",
        help="read one decoder layer at a time from the safetensors shards and write the output as it goes (chosen automatically when the model is larger than free host memory; no perplexity)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="with --stream: continue a killed run from what its .<out>.stream directory holds",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--plot",
        action="store_true",
        help="with --out: also write the pictures of `stun-lightning report` into OUT/report/",
    )

    r = sub.add_parser(
        "report",
        help="pictures of what pruning did (PNGs + one self-contained HTML page) from a `prune --out` directory",
    )
    r.add_argument("model_dir", metavar="DIR", help="directory written by `stun-lightning prune --out`")
    r.add_argument("--out", help="write the pictures here (default: DIR/report)")

    e = sub.add_parser("eval", help="sliding-window perplexity of a model on a text, or lm-eval tasks with --tasks")
    e.add_argument("--model", help="saved model directory or hub id (default: the embedded reference MoE)")
    e.add_argument("--tokenizer")
    e.add_argument("--data", help="text to score: .txt, .jsonl or a directory (default: shipped held-out mix)")
    e.add_argument("--seq-len", type=int, default=256)
    e.add_argument("--stride", type=int, help="sliding-window stride (default: seq-len, no overlap)")
    e.add_argument("--max-tokens", type=int)
    e.add_argument("--device")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    e.add_argument(
        "--tasks",
        help="lm-evaluation-harness tasks, comma-separated: shipped offline ones (stun_gsm8k, stun_wikitext2, stun_cloze), --include-path ones, or lm-eval's (hub data)",
    )
    e.add_argument("--include-path", help="folder of your own lm-eval task YAMLs")
    e.add_argument("--limit", type=float, help="documents per task (fraction if < 1), as lm-eval's --limit")
    e.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    e.add_argument("--batch-size", type=int, default=1)
    e.add_argument("--baseline", help="also score this model (e.g. the dense one) and print its column beside")
    e.add_argument(
        "--output",
        help="write the results as JSON here (inside a model directory: eval_results.json is shown on its model card)",
    )

    x = sub.add_parser(
        "export",
        help="write a pruned model as hf (dense, zeros kept), sparse (2:4 compressed) or aoti (compiled decode step)",
    )
    x.add_argument("--model", required=True, help="pruned model directory (from `prune --out`) or a sparse export")
    x.add_argument(
        "--format",
        required=True,
        choices=["hf", "sparse", "aoti"],
        help="hf: plain transformers directory; sparse: 2:4 values + metadata; aoti: AOTInductor package",
    )
    x.add_argument("--out", required=True, help="write here (temp dir, renamed at the end)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    x.add_argument("--device", help="aoti: compile for this device (default: cuda if available)")
    x.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast the weights before exporting")
    x.add_argument("--max-cache-len", type=int, default=256, help="aoti: static KV-cache length of the decode step")

    sub.add_parser(
        "fit", help="prune and fine-tune with Lightning (args go to stun_lightning.callbacks.cli)", add_help=False
    )
    sub.add_parser("validate", help="validate a fit recipe's model with Lightning", add_help=False)
    return parser


def run_report(args) -> int:
    from .figures import write_report

    target = Path(args.out) if args.out else Path(args.model_dir) / "report"
    data = write_report(args.model_dir, target)
    print(f"stun-lightning report: {len(data)} pictures ({', '.join(data)}) -> {target / 'report.html'}")
    return 0


def run_eval(args) -> int:
    if args.tasks is not None:
        return run_eval_tasks(args)
    from .evaluate import next_token_accuracy, perplexity

    if args.data is not None and not Path(args.data).exists():
        raise FileNotFoundError(f"--data {args.data} does not exist")
    device = default_device(args.device)
    model, tokenizer, name = load_model_and_tokenizer(args.model, args.tokenizer, args.dtype)
    model.to(device)
    kwargs = dict(seq_len=args.seq_len, stride=args.stride, max_tokens=args.max_tokens)
    value = perplexity(model, tokenizer, args.data, **kwargs)
    accuracy = next_token_accuracy(model, tokenizer, args.data, **kwargs)
    print(
        json.dumps(
            {
                "model": str(name),
                "data": args.data or "shipped held-out mix",
                "perplexity": value,
                "next_token_accuracy": accuracy,
                **kwargs,
            },
            indent=2,
        )
    )
    return 0


def run_eval_tasks(args) -> int:
    from .harness import evaluate_tasks, results_table

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.limit is not None and args.limit <= 0:
        raise UsageError(f"--limit must be positive, got {args.limit}")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    for label, path in (("--baseline", args.baseline),):
        if path is not None and not Path(path).exists() and path.startswith((".", "/", "~")):
            raise FileNotFoundError(f"{label} {path} does not exist")
    device = default_device(args.device)
    kwargs = dict(include_path=args.include_path, limit=limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size)

    def score(spec):
        model, tokenizer, name = load_model_and_tokenizer(spec, args.tokenizer, args.dtype)
        return evaluate_tasks(model.to(device), tokenizer, tasks, **kwargs), name

    results, name = score(args.model)
    baseline = score(args.baseline)[0] if args.baseline else None
    print(f"\nstun-lightning eval: {name}" + (f" (baseline: {args.baseline})" if baseline else "") + "\n")
    print(results_table(results, baseline))
    if args.output:
        payload = {"model": str(name), "tasks": results, "limit": limit} | (
            {"baseline": {"model": args.baseline, "tasks": baseline}} if baseline else {}
        )
        out = Path(args.output)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(payload, indent=2))
        tmp.replace(out)
    return 0


def run_export(args) -> int:
    from .export import export_directory

    if args.max_cache_len < 1:
        raise UsageError(f"--max-cache-len must be positive, got {args.max_cache_len}")
    device = default_device(args.device) if args.format == "aoti" else args.device
    out = export_directory(
        args.model,
        args.out,
        args.format,
        overwrite=args.overwrite,
        device=device,
        torch_dtype=getattr(torch, args.dtype) if args.dtype else None,
        max_cache_len=args.max_cache_len,
    )
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"stun-lightning export: {args.format} -> {out} ({size / 2**20:.1f} MiB on disk)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["fit"], ["validate"]):
        from .callbacks.cli import main as fit_main

        return fit_main(argv)
    args = build_parser().parse_args(argv)
    try:
        return {"prune": run_prune, "eval": run_eval, "export": run_export, "report": run_report}[args.command](args)
    except (UsageError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"stun-lightning {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
