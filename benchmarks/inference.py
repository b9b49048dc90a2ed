"""Inference speed of pruned MoE models: dense, 2:4, 25% of experts removed, and both, in one table.

    python -m benchmarks.inference                         # GPU: Mixtral-8x7B and Qwen3-30B-A3B shapes
    python -m benchmarks.inference --quick --device cpu    # tiny shapes, eager, a CPU smoke test
    python -m benchmarks.inference --scope layer --shapes mixtral --out results.md

Shapes: Mixtral-8x7B (hidden 4096, FFN 14336, 8 experts, top-2) and Qwen3-30B-A3B (hidden 2048,
expert FFN 768, 128 experts, top-8), as transformers ``MixtralForCausalLM`` / ``Qwen3MoeForCausalLM``
with the real layer shapes, ``--layers`` decoder layers (default 2) and a small vocabulary; random
bf16 weights, every expert matrix masked 2:4 by magnitude (``stun_lightning.patterns``). Variants, each
built from that masked model with the core's functions:

* ``dense``: transformers' ``grouped_mm`` experts (the baseline);
* ``2:4``: :func:`stun_lightning.sparse.sparsify` (compressed values + metadata, ``stun_sparse24``);
* ``experts-25%``: a quarter of each layer's experts removed (:func:`stun_lightning.keep_experts`,
  seeded random choice), dense ``grouped_mm``;
* ``both``: experts removed, then sparsified.

Rows: one MoE layer (decoder layer 0's block) and the whole model, at decode (1, 8, 32 tokens per
step; the model decodes a batch of that many sequences, one token each, against a static KV cache)
under ``torch.compile`` with static shapes, the compiled call captured in one CUDA graph and
replayed (``--graphs capture``, as a server runs a compiled model; ``--graphs trees`` uses
``mode="reduce-overhead"`` instead, torch's CUDA-graph trees with their Python launch path on
every call), and at prefill (2048 tokens, default compile mode, no cache). Every variant is compiled the same way, and every
speed is given as a ratio to ``dense`` in the same run and as a fraction of the variant's own floor:
max(bytes it must read / measured copy bandwidth, matmul FLOPs / measured bf16 matmul rate). Bytes
are those of the experts the routing touched (values + metadata for 2:4) plus, for the model, every
other weight and the KV cache; FLOPs are dense (Triton has no sparse tensor-core ``mma.sp``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import transformers

from benchmarks.device_rates import make_timer, measured_rates
from benchmarks.inference_rows import Setup
from benchmarks.inference_tables import autotuned, cells, table, targets

HEADS = dict(num_attention_heads=32, head_dim=128)
SHAPES = {  # name -> (model_type, config fields): the real models' layer shapes
    "mixtral": (
        "mixtral",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_local_experts=8,
            num_experts_per_tok=2,
            num_key_value_heads=8,
            **HEADS,
        ),
    ),
    "qwen3": (
        "qwen3_moe",
        dict(
            hidden_size=2048,
            moe_intermediate_size=768,
            intermediate_size=6144,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            num_key_value_heads=4,
            **HEADS,
        ),
    ),
}
TINY = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)
QUICK_SHAPES = {
    "mixtral": (
        "mixtral",
        dict(hidden_size=64, intermediate_size=128, num_local_experts=8, num_experts_per_tok=2, **TINY),
    ),
    "qwen3": (
        "qwen3_moe",
        dict(
            hidden_size=64,
            moe_intermediate_size=32,
            intermediate_size=128,
            num_experts=16,
            num_experts_per_tok=4,
            norm_topk_prob=True,
            **TINY,
        ),
    ),
}
VARIANTS = ("dense", "2:4", "experts-25%", "both")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--scope", nargs="+", default=["layer", "model"], choices=["layer", "model"])
    p.add_argument("--tokens", nargs="+", type=int, default=None, help="decode tokens per step (default 1 8 32)")
    p.add_argument("--prefill", type=int, default=None, help="prefill tokens (default 2048; 64 with --quick)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the whole model")
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--cache-len", type=int, default=512, help="static KV cache slots; decode writes the last one")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile every variant (default: on CUDA only)",
    )
    p.add_argument(
        "--graphs",
        default="capture",
        choices=["capture", "trees"],
        help="decode CUDA graphs: one captured graph of the compiled call (default), or torch.compile's reduce-overhead trees",
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes (hidden 64), a smoke test")
    p.add_argument(
        "--budget-s", type=float, default=390.0, help="rows not started after this many seconds are reported as skipped"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the markdown to this file")
    args = p.parse_args(argv)
    args.tokens = args.tokens or [1, 8, 32]
    args.prefill = args.prefill or (64 if args.quick else 2048)
    if args.prefill in args.tokens:
        p.error(f"--prefill {args.prefill} is also a decode size in --tokens; choose another")
    args.all_tokens = [*args.tokens, args.prefill]
    args.compile = args.device != "cpu" if args.compile is None else args.compile
    args.variants = ["dense"] + [v for v in VARIANTS[1:] if v in args.variants]  # dense first: every ratio needs it
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU: pass --device cpu (with --quick for tiny shapes)", file=sys.stderr)
        return 2
    timer, started = make_timer(args.device), time.perf_counter()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    bw, flops = measured_rates(args.device, timer)
    head = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, {device_name}; copy {bw / 1e12:.2f} TB/s, "
        f"bf16 matmul {flops / 1e12:.1f} TFLOP/s (measured in this run); compile: {'yes' if args.compile else 'no (eager)'}"
    )
    print(head, flush=True)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    setups, failures = {}, {}
    for name in args.shapes:
        try:
            setups[name] = Setup(shapes[name], args)
            print(f"[{time.perf_counter() - started:5.0f}s] built {name}", flush=True)
        except Exception as err:  # noqa: BLE001 - one shape's failure is reported in its rows
            failures[name] = f"{type(err).__name__}: {str(err)[:600]}"
            print(f"{name}: setup FAILED {failures[name]}", flush=True)
    rows, errors = [], [f"{name} setup: {msg}" for name, msg in failures.items()]
    for scope in args.scope:
        for t in args.all_tokens:  # shapes inner: a run cut by the budget still covers both shapes
            for name in args.shapes:
                for variant in args.variants:
                    row = dict(scope=scope, shape=name, variant=variant, tokens=t)
                    elapsed = time.perf_counter() - started
                    if name in failures:
                        row["error"] = "setup failed"
                    elif elapsed > args.budget_s:
                        row["error"] = "skipped (budget)"
                    else:
                        try:
                            row.update(setups[name].row(scope, variant, t, bw, flops, timer))
                        except Exception as err:  # noqa: BLE001 - reported in the row, the run goes on
                            row["error"] = type(err).__name__
                            errors.append(f"{scope} {name} {variant} T={t}: {type(err).__name__}: {str(err)[:600]}")
                            torch._dynamo.reset()
                            if args.device == "cuda":
                                torch.cuda.empty_cache()
                    rows.append(row)
                    done = " | ".join(cells(row, None)[:1] + cells(row, None)[3:])
                    print(f"[{time.perf_counter() - started:5.0f}s] {scope} {name} {variant} T={t}: {done}", flush=True)
    notes = [
        head,
        "Rows: us per call (median); tokens/s = tokens per call / time; x dense = dense time / this time, same run. "
        + (
            f"Decode rows ({', '.join(map(str, args.tokens))} tokens) ran under torch.compile, "
            + (
                "captured in one CUDA graph and replayed (`--graphs capture`); "
                if args.graphs == "capture"
                else 'mode="reduce-overhead" (CUDA-graph trees, `--graphs trees`); '
            )
            + f"the prefill row ({args.prefill} tokens) under the default mode. L2 flushed between timed calls. "
            if args.compile
            else "Eager (no torch.compile). "
        )
        + f"`layer`: decoder layer 0's MoE block, input [1, tokens, hidden]. `model`: the "
        f"whole {args.layers}-layer model (vocab {args.vocab}); decode = a batch of `tokens` sequences, one token each, against a static "
        f"KV cache of {args.cache_len} slots (writes the last slot); prefill = one sequence, no cache.",
        "floor us = max(bytes read / copy bandwidth, matmul FLOPs / matmul rate): bytes of the experts the routing touched (`experts`, "
        "per layer; 2:4 values + metadata) plus, for the model, all other weights and the KV cache; FLOPs dense, attention scores "
        "included. of floor = floor / time. err: relative error of the timed output (`model`: logits) against the float32 masked dense "
        "model with the same experts, its routers forced to the top-k that the variant chose in an eager bf16 run (so bf16 router "
        "ties do not count); err eager: of that eager run itself. They differ where the compiled model's slightly different "
        "rounding flips a near-tied route (whole model, many tokens). weights MB: stored tensors of the layer's experts (`layer`) "
        "or of the whole model (`model`).",
    ]
    md = "\n\n".join([*notes, table(rows), targets(rows, args)])
    if args.device == "cuda" and {"2:4", "both"} & set(args.variants):
        md += "\n\n" + autotuned()
    if errors:
        md += "\n\nErrors:\n" + "\n".join(f"- {e}" for e in errors)
    print("\n" + md, flush=True)
    if args.out:
        args.out.write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
