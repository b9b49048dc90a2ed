"""What pruning costs: wall time, peak memory and forward passes of each STUN phase.

Two tables, printed as markdown (and written as one CSV with ``--csv PATH``):

1. Per layer shape (tiny; Mixtral-8x7B: hidden 4096, expert FFN 14336, 8 experts, top-2;
   Qwen3-30B-A3B: hidden 2048, expert FFN 768, 128 experts, top-8), the structured phase with STUN
   router distances (no forward pass) and co-activation distances (one routing pass), the
   calibration pass (routing + input norms) and the unstructured phase (Wanda). The model stays on
   the CPU and ``device`` is passed to ``prune``/``calibrate``, so one decoder layer at a time
   visits the accelerator: peak GPU memory is compared with one decoder layer's bytes.
2. Forward passes each expert-pruning method needs as the expert count grows, measured from
   ``PruneReport.layer_passes``, beside the subsets NAEE would enumerate per layer
   (``C(E, E * (1 - s))``).
3. The field's expert-pruning methods (REAP, UNCURL, NAEE, EEP; STUN as the baseline) on the same
   sweep with a uniform budget: forward passes counted by hooks and wall time; NAEE refused past
   its subset limit, with the passes it would have needed.

Weights are random (cost does not depend on them); bf16 on CUDA, float32 on CPU.

    python -m benchmarks.prune_cost                        # GPU: all shapes, 16 x 512 tokens
    python -m benchmarks.prune_cost --quick --device cpu   # tiny shapes only, under a minute on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import csv
import platform
import time
from pathlib import Path

import torch
import transformers

from benchmarks.cost_measurement import release_memory, timed
from benchmarks.prune_cost_methods import method_scaling
from benchmarks.prune_cost_models import (
    SHAPES,
    SWEEP_DIMS,
    build_model,
    calibration_ids,
    layer_bytes,
    naee_subsets,
    sweep_model,
)
from benchmarks.prune_cost_tables import (
    CSV_FIELDS,
    Row,
    error_notes,
    method_table,
    phase_table,
    scaling_table,
)
from stun_lightning import StunRecipe, calibrate, moe_layers, prune

EXPERT_METHODS = {  # label -> recipe fields of the structured phase
    "STUN router": dict(expert_method="stun", distance="router"),
    "STUN co-activation": dict(expert_method="stun", distance="coactivation"),
    "frequency": dict(expert_method="frequency"),
    "random": dict(expert_method="random"),
}


# ---------------------------------------------------------------- benchmarks


def phase_costs(shape: str, args, device: torch.device, dtype: torch.dtype) -> list[Row]:
    """Table 1: the three phases of STUN on one layer shape."""
    family, fields = SHAPES[shape]
    start = time.perf_counter()
    model = build_model(family, fields, args.layers, args.seq_len, dtype, device)
    print(
        f"  {shape}: built {args.layers} layer(s), {sum(p.numel() for p in model.parameters()) / 1e6:,.1f} M params, in {time.perf_counter() - start:.1f} s",
        flush=True,
    )
    ids = calibration_ids(model.config.vocab_size, args.samples, args.seq_len)
    moe = moe_layers(model)[0]
    E, k = moe.num_experts, moe.top_k
    one_layer = layer_bytes(model)
    runs = [
        ("structured", "STUN router", dict(expert_method="stun", distance="router", sparsity=0.0)),
        ("structured", "STUN co-activation", dict(expert_method="stun", distance="coactivation", sparsity=0.0)),
        ("calibration", "routing + norms", None),
        (
            "unstructured",
            f"Wanda {args.sparsity:.0%}",
            dict(expert_sparsity=0.0, sparsity=args.sparsity, metric="wanda"),
        ),
    ]
    rows = []
    for phase, method, recipe_fields in runs:
        work = copy.deepcopy(model)  # prune works in place
        if recipe_fields is None:
            m, error = timed(
                device,
                calibrate,
                work,
                ids,
                collect=("routing", "norms"),
                device=device,
                batch_size=args.batch_size,
                progress=False,
            )
            passes, phase_s = (None, None) if error else (m.result.layer_passes, m.result.seconds)
        else:
            recipe = StunRecipe(
                **{"expert_sparsity": args.expert_sparsity, **recipe_fields, "batch_size": args.batch_size}
            )
            m, error = timed(device, prune, work, recipe, calibration=ids, device=device, progress=False)
            passes, phase_s = (None, None) if error else (m.result.layer_passes.get(phase, 0), m.result.seconds[phase])
        rows.append(
            Row(
                "phase_cost",
                shape,
                E,
                k,
                args.layers,
                phase,
                method,
                passes,
                phase_s,
                m.seconds,
                m.gpu_peak,
                m.rss_growth,
                one_layer,
                error=error,
            )
        )
        del work, m
        print(
            f"  {shape}: {phase} / {method}: {rows[-1].call_s:.2f} s{'  FAILED: ' + error if error else ''}", flush=True
        )
    del model
    return rows


def pass_scaling(args, device: torch.device, dtype: torch.dtype) -> list[Row]:
    """Table 2: forward passes (and structured-phase time) of each expert method versus E."""
    rows = []
    for E in args.experts:
        model, k, ids = sweep_model(args, E, device, dtype)
        naee = {s: naee_subsets(E, s) for s in (0.25, 0.5)}
        for label, recipe_fields in EXPERT_METHODS.items():
            work = copy.deepcopy(model)
            recipe = StunRecipe(
                expert_sparsity=args.expert_sparsity, sparsity=0.0, batch_size=args.batch_size, **recipe_fields
            )
            m, error = timed(device, prune, work, recipe, calibration=ids, device=device, progress=False)
            passes, phase_s = (
                (None, None) if error else (m.result.layer_passes.get("structured", 0), m.result.seconds["structured"])
            )
            rows.append(
                Row(
                    "expert_scaling",
                    args.sweep_dims,
                    E,
                    k,
                    args.layers,
                    "structured",
                    label,
                    passes,
                    phase_s,
                    m.seconds,
                    naee=naee,
                    error=error,
                )
            )
            del work, m
        failed = [r.method for r in rows[-len(EXPERT_METHODS) :] if r.error]
        print(f"  {E} experts done{'  FAILED: ' + ', '.join(failed) if failed else ''}", flush=True)
        del model
    return rows


def warm_up(args, device: torch.device, dtype: torch.dtype) -> None:
    """Pay first-call costs (CUDA context, cuBLAS, attention kernels) outside the measured rows.

    A tiny model runs the routing pass and Wanda on batches of the measured shape.
    """
    family, fields = SHAPES["tiny"]
    model = build_model(family, fields, 1, args.seq_len, dtype, device)
    ids = calibration_ids(model.config.vocab_size, min(args.samples, args.batch_size), args.seq_len)
    recipe = StunRecipe(expert_sparsity=0.25, expert_method="frequency", sparsity=0.5, batch_size=args.batch_size)
    prune(model, recipe, calibration=ids, device=device, progress=False)
    del model
    release_memory(device)


# ---------------------------------------------------------------- output


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes only (CPU smoke test, < 60 s on 2 cores)")
    p.add_argument(
        "--shapes", default=None, help=f"comma-separated, from {','.join(SHAPES)} (default: all; tiny with --quick)"
    )
    p.add_argument("--experts", default="8,16,64,128", help="expert counts of the pass-count sweep")
    p.add_argument(
        "--sweep-dims",
        choices=list(SWEEP_DIMS),
        default=None,
        help="layer dims of the sweep (default: qwen3; tiny with --quick)",
    )
    p.add_argument("--samples", type=int, default=None, help="calibration sequences (default 16; 8 with --quick)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 512; 128 with --quick)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--layers", type=int, default=2, help="decoder layers per model (1 or 2 keep real shapes small)")
    p.add_argument("--expert-sparsity", type=float, default=0.25)
    p.add_argument("--sparsity", type=float, default=0.5, help="Wanda sparsity inside experts")
    p.add_argument("--skip-sweep", action="store_true", help="only the phase-cost table")
    p.add_argument("--method-experts", default="8,16,32,64,128", help="expert counts of the NAEE/EEP/UNCURL/REAP table")
    p.add_argument("--skip-methods", action="store_true", help="no NAEE/EEP/UNCURL/REAP table")
    p.add_argument("--csv", type=Path, default=None, help="also write every row here")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch.cuda.is_available() is False; use --device cpu")
    args.shapes = (args.shapes or ("tiny" if args.quick else ",".join(SHAPES))).split(",")
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        p.error(f"unknown shapes {unknown}; choose from {list(SHAPES)}")
    args.sweep_dims = args.sweep_dims or ("tiny" if args.quick else "qwen3")
    args.experts = [int(e) for e in args.experts.split(",")]
    args.method_experts = [int(e) for e in args.method_experts.split(",")]
    args.samples = args.samples or (8 if args.quick else 16)
    args.seq_len = args.seq_len or (128 if args.quick else 512)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(
        f"device: {device_name(device)}; model kept on CPU, layers run on {device}; dtype {str(dtype).removeprefix('torch.')}"
    )
    print(
        f"calibration: {args.samples} x {args.seq_len} tokens (batch {args.batch_size}); {args.layers} decoder layer(s) per model; "
        f"expert sparsity {args.expert_sparsity:.0%}, Wanda sparsity {args.sparsity:.0%}",
        flush=True,
    )
    warm_up(args, device, dtype)
    rows = []
    for shape in args.shapes:
        rows += phase_costs(shape, args, device, dtype)
    sweep = [] if args.skip_sweep else pass_scaling(args, device, dtype)
    methods = [] if args.skip_methods else method_scaling(args, device, dtype)

    print("\n## Cost of each phase (one decoder layer at a time on the device)\n")
    print(phase_table(rows, device))
    print(
        "\nphase s: the phase's own time as the library reports it; call s: the whole synchronized call (prune also "
        "counts the parameters before and after). Wanda passes each layer twice: once to collect input norms, once "
        "after masking so the next layer calibrates on pruned activations (sequential=True). The structured phase's "
        "expert surgery runs on the CPU copy of the model, hence its host RSS growth."
    )
    if sweep:
        dims = SWEEP_DIMS[args.sweep_dims]
        print(
            f"\n## Forward passes of expert pruning versus expert count "
            f"({args.sweep_dims} dims: hidden {dims['hidden_size']}, expert FFN {dims['moe_intermediate_size']})\n"
        )
        print(scaling_table(sweep, args.expert_sparsity))
        print(
            "\nNAEE enumerates C(E, E(1-s)) expert subsets per layer, each scored by the MoE block's output error on the calibration tokens (table below)."
        )
    if methods:
        print(
            f"\n## Forward passes of the field's expert-pruning methods versus expert count ({args.sweep_dims} dims)\n"
        )
        print(method_table(methods, args.expert_sparsity))
        print(
            "\nMoE-block / router passes: forward calls of every MoE block / router over the calibration set, summed over layers, "
            "counted by hooks (REAP shares the one statistics pass; UNCURL, NAEE and EEP run their own passes only). "
            "NAEE re-runs only the router per subset (each expert's output is computed once per batch), hence its router passes. "
            "EEP's rows run 8 evaluations; the note extrapolates the official 400."
        )
    notes = error_notes(rows + sweep + methods)
    if notes:
        print("\n" + notes)
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            for r in rows + sweep + methods:
                writer.writerow(r.csv())
        print(f"\nwrote {len(rows) + len(sweep) + len(methods)} rows to {args.csv}")
    if notes:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
