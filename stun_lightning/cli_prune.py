"""``stun-lightning prune``: the recipe its flags make (the default without ``--recipe``), the
in-memory run, and the streaming run for models larger than host memory."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from .cli_inputs import UsageError, default_device, load_model_and_tokenizer
from .recipe import DEFAULT_RECIPE, StunRecipe


def fraction_or_auto(text: str) -> float | str:
    """``--expert-sparsity``: a fraction, or ``auto`` (the split chosen per layer for --total-sparsity)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction or 'auto', got {text!r}") from None


#: recipe fields settable by a ``prune`` flag (``--expert-sparsity`` ...), overriding --recipe
RECIPE_FLAGS = {
    "expert_sparsity": fraction_or_auto,
    "sparsity": float,
    "total_sparsity": float,
    "expert_method": str,
    "layer_budget": str,
    "expert_merge": str,
    "split_criterion": str,
    "split_groups": int,
    "distance": str,
    "metric": str,
    "allocation": str,
    "pattern": str,
    "calibration_samples": int,
    "calibration_seq_len": int,
    "seed": int,
}


#: without ``--recipe``, a ``--sparsity`` inside experts or an N:M ``--pattern`` (``auto`` needs a
#: total over unstructured masks) fix the split (``--stream`` keeps ``auto``):
#: 25% of experts, the same count per layer, the rest of the 55% inside the survivors
FIXED_SPLIT = dict(expert_sparsity=0.25, layer_budget="uniform")


def recipe_from_args(args) -> StunRecipe:
    data = dict(DEFAULT_RECIPE) if args.recipe is None else StunRecipe.from_yaml(args.recipe).to_dict()
    inner = args.sparsity is not None or (args.pattern or "unstructured") != "unstructured"
    if args.recipe is None and inner:
        data.update(FIXED_SPLIT, total_sparsity=None)
    for field in RECIPE_FLAGS:
        value = getattr(args, field)
        if value is not None:
            data[field] = value
    return StunRecipe.from_dict(data)


def run_prune(args) -> int:
    from .data import calibration_blocks
    from .evaluate import perplexity
    from .serialization import save_pruned
    from .prune import check_recipe, prune

    recipe = recipe_from_args(args)
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not args.overwrite:
        raise UsageError(f"output directory {out} already exists; choose another --out or pass --overwrite")
    for label, file in (("--calib", args.calib), ("--eval-data", args.eval_data)):
        if file is not None and not Path(file).exists():
            raise FileNotFoundError(f"{label} {file} does not exist")
    device = default_device(args.device)
    progress = not args.quiet
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar
    if args.resume and not args.stream:
        raise UsageError("--resume continues a streaming run; add --stream")
    if args.model is not None and (args.stream or _larger_than_memory(args.model)):
        return _run_prune_streaming(args, recipe, out, device, progress)
    start = time.perf_counter()
    model, tokenizer, name = load_model_and_tokenizer(args.model, args.tokenizer, args.dtype)
    check_recipe(model, recipe)
    calibration = calibration_blocks(
        tokenizer, args.calib, recipe.calibration_samples, recipe.calibration_seq_len, recipe.seed
    )

    def ppl():
        if not args.eval_tokens:
            return None
        # scored where the model lives (pruning moves one layer at a time to `device` and back)
        return perplexity(
            model,
            tokenizer,
            args.eval_data,
            seq_len=recipe.calibration_seq_len,
            max_tokens=args.eval_tokens,
            progress=progress,
        )

    ppl_before = ppl()
    if args.plot and out is None:
        raise UsageError("--plot writes into the output directory; pass --out DIR too")
    report = prune(model, recipe, calibration, device=device, progress=progress, record_figures=out is not None)
    ppl_after = ppl()
    if ppl_before is not None:
        report.perplexity = {"before": ppl_before, "after": ppl_after}
    report.seconds["total"] = time.perf_counter() - start
    report.base_model = str(args.model) if args.model else "stun-lightning embedded reference MoE"
    print(f"\nstun-lightning prune: {name}\n")
    print(report.to_markdown())
    if out is not None:
        save_pruned(
            model,
            out,
            tokenizer=tokenizer,
            overwrite=args.overwrite,
            extra_files={"stun_report.json": report.to_json(), "stun_recipe.yaml": _yaml(recipe)},
        )
        print(f"\nsaved to {out}")
        if args.plot:
            from .figures import write_report

            write_report(out)
            print(f"pictures: {out / 'report' / 'report.html'}")
    return 0


def _larger_than_memory(model_spec: str) -> bool:
    """Whether a local checkpoint's safetensors exceed the host memory available now (hub ids: unknown, False)."""
    path = Path(model_spec)
    if not path.is_dir():
        return False
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    try:
        import psutil

        free = psutil.virtual_memory().available
    except ImportError:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return size > free


def _run_prune_streaming(args, recipe: StunRecipe, out: Path | None, device: str, progress: bool) -> int:
    from .data import calibration_blocks
    from .stream import prune_streaming, resolve_model_dir
    from .tiny import load_tokenizer

    if out is None:
        raise UsageError("streaming writes the pruned model as it goes: pass --out DIR")
    start = time.perf_counter()
    directory = resolve_model_dir(args.model)
    try:
        tokenizer = load_tokenizer(args.tokenizer or directory)
    except (OSError, ValueError) as err:
        raise UsageError(f"no tokenizer found with {args.model}; pass --tokenizer PATH_OR_HUB_ID ({err})") from err
    calibration = calibration_blocks(
        tokenizer, args.calib, recipe.calibration_samples, recipe.calibration_seq_len, recipe.seed
    )
    dtype = getattr(torch, args.dtype) if args.dtype else None
    report = prune_streaming(
        directory,
        out,
        recipe,
        calibration,
        tokenizer=tokenizer,
        device=device,
        torch_dtype=dtype,
        progress=progress,
        resume=args.resume,
        overwrite=args.overwrite,
        extra_files={"stun_recipe.yaml": _yaml(recipe)},
    )
    report.seconds["total"] = time.perf_counter() - start
    print(f"\nstun-lightning prune --stream: {args.model}\n")
    print(report.to_markdown())
    print(f"\nsaved to {out}")
    return 0


def _yaml(recipe: StunRecipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
