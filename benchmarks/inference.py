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
from transformers import StaticCache

from benchmarks.device_rates import make_timer, measured_rates
from benchmarks.inference_models import (
    RoutingRecorder,
    build_model,
    build_variants,
    decode_step,
    float_reference,
    moe_blocks,
    nbytes,
    nbytes_of_cache,
    prefill_step,
)

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
DENSE_OF = {
    "dense": "dense",
    "2:4": "dense",
    "experts-25%": "experts-25%",
    "both": "experts-25%",
}  # the float32 reference
COLUMNS = [
    "scope",
    "shape",
    "variant",
    "tokens",
    "us",
    "tokens/s",
    "x dense",
    "floor us",
    "of floor",
    "err",
    "err eager",
    "weights MB",
    "experts",
]


# ---------------------------------------------------------------- measurement


def compiled(fn, compile: bool, decode: bool, graphs: str = "capture"):
    """``fn`` under torch.compile; at decode also in a CUDA graph: ``capture`` (default) compiles in
    the default mode and captures the compiled call in one ``torch.cuda.CUDAGraph`` that each call
    replays (as a server does around a compiled model); ``trees`` is ``mode="reduce-overhead"``
    (torch's CUDA-graph trees, whose Python launch path runs on every call)."""
    if not compile:
        return fn
    torch._dynamo.reset()  # a fresh cache per row: no recompile limits, CUDA-graph pools freed
    if decode and graphs == "trees":
        return torch.compile(fn, mode="reduce-overhead", dynamic=False)
    fn = torch.compile(fn, dynamic=False)
    return captured(fn) if decode and torch.cuda.is_available() else fn


def captured(fn):
    """``fn`` captured in a CUDA graph on its first call (after warm-up calls on a side stream, which
    also compile and autotune); every call replays the graph on the same input tensors."""
    state = {}

    def replay(*inputs):
        if "graph" not in state:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    fn(*inputs)
            torch.cuda.current_stream().wait_stream(stream)
            state["graph"] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(state["graph"]):
                state["out"] = fn(*inputs)
        state["graph"].replay()
        return state["out"]

    return replay


def measure(fn, inputs, ref, timer) -> tuple[float, float]:
    """(us per call, relative error of the output against ``ref``) after three warm-up calls."""
    with torch.no_grad():
        for _ in range(3):
            fn(*inputs)
        out = fn(*inputs).float().clone()  # CUDA-graph outputs are overwritten by the next replay
        return timer(lambda: fn(*inputs)), relerr(out, ref)


def relerr(out, ref) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


# ---------------------------------------------------------------- rows


class Setup:
    """One shape's variants, their inputs and (made on first use) their float32 references."""

    def __init__(self, shape, args):
        self.args = args
        dense = build_model(shape, args.layers, args.vocab, args.device, args.seed)
        self.models = build_variants(dense, args.variants, args.seed)
        cfg = dense.config
        self.hidden, self.top_k, self.layers = cfg.hidden_size, cfg.num_experts_per_tok, cfg.num_hidden_layers
        self.attn = cfg.num_attention_heads * cfg.head_dim  # per-token width of attention scores
        experts = [e for _, _, e in moe_blocks(dense)]
        self.expert_params = sum(p[0].numel() for p in (experts[0].gate_up_proj, experts[0].down_proj))
        embed = dense.get_input_embeddings().weight.numel()
        self.other_params = (
            sum(p.numel() for p in dense.parameters())
            - embed
            - self.expert_params * sum(e.num_experts for e in experts)
        )
        g = torch.Generator(device=args.device).manual_seed(args.seed)
        self.layer_in = {
            t: torch.randn(1, t, self.hidden, device=args.device, dtype=torch.bfloat16, generator=g)
            for t in args.all_tokens
        }
        self.ids = {
            t: torch.randint(args.vocab, (t, 1) if t in args.tokens else (1, t), device=args.device, generator=g)
            for t in args.all_tokens
        }
        self.references = {}  # base variant -> float32 copy, made on first use

    def reference(self, variant):
        base = DENSE_OF[variant]
        if base not in self.references:
            self.references[base] = float_reference(self.models[base])
        return self.references[base]

    def model_inputs(self, t):
        decode = t in self.args.tokens
        pos = self.args.cache_len - 1 if decode else 0
        positions = (
            torch.arange(pos, pos + self.ids[t].shape[1], device=self.args.device).expand_as(self.ids[t]).contiguous()
        )
        return self.ids[t], positions

    def model_fn(self, model, t):
        if t not in self.args.tokens:
            return prefill_step(model)
        cache = StaticCache(config=model.config, max_cache_len=self.args.cache_len)
        step = decode_step(model, cache, self.args.cache_len - 1)
        with torch.no_grad():
            step(*self.model_inputs(t))  # allocates the cache outside compile (static addresses for CUDA graphs)
        step.cache = cache
        return step

    def row(self, scope, variant, t, bw, flops, timer):
        model, decode = self.models[variant], t in self.args.tokens
        experts = [e for _, _, e in moe_blocks(model)]
        if scope == "layer":
            block, router, _ = moe_blocks(model)[0]
            x = self.layer_in[t]
            with torch.no_grad():
                _, weights, index = router(x.view(-1, self.hidden))
                eager = block(x)
                ref_experts = moe_blocks(self.reference(variant))[0][2]
                ref = ref_experts(x.view(-1, self.hidden).float(), index, weights.float()).view(x.shape)
            fn, inputs, weight_bytes = (
                compiled(block, self.args.compile, decode, self.args.graphs),
                (x,),
                nbytes(experts[0]),
            )
            routing, other_bytes, other_flops = [(weights, index)], 0, 0
        else:
            step = self.model_fn(model, t)
            inputs = self.model_inputs(t)
            with torch.no_grad(), RoutingRecorder(model) as rec:
                eager = step(*inputs)
            with torch.no_grad(), RoutingRecorder(self.reference(variant), force=rec.routing):
                ref = self.model_fn(self.reference(variant), t)(*inputs).float()
            routing, weight_bytes = rec.routing, nbytes(model)
            fn = compiled(step, self.args.compile, decode, self.args.graphs)
            kv = nbytes_of_cache(step.cache) if decode else 0
            other_bytes = weight_bytes - sum(nbytes(e) for e in experts) + kv
            context = self.args.cache_len if decode else (t + 1) / 2
            other_flops = 2 * t * self.other_params + 4 * t * context * self.attn * self.layers
        touched = [index.unique().numel() for _, index in routing]
        read = other_bytes + sum(n * nbytes(e) / e.num_experts for n, e in zip(touched, experts))
        work = other_flops + 2 * t * self.top_k * self.expert_params * len(routing)
        eager_err = relerr(eager, ref)
        us, err = measure(fn, inputs, ref, timer)
        return dict(
            us=us,
            floor=max(read / bw, work / flops) * 1e6,
            err=err,
            eager_err=eager_err,
            mb=weight_bytes / 2**20,
            experts=touched,
        )


def cells(row: dict, dense: dict | None) -> list[str]:
    if "error" in row:
        return [f"error: {row['error']}"] + ["-"] * 8
    ratio = f"{dense['us'] / row['us']:.2f}" if dense and "us" in dense else "-"
    return [
        f"{row['us']:.1f}",
        f"{row['tokens'] / row['us'] * 1e6:,.0f}",
        ratio,
        f"{row['floor']:.1f}",
        f"{row['floor'] / row['us']:.2f}",
        f"{row['err']:.1e}",
        f"{row['eager_err']:.1e}",
        f"{row['mb']:,.1f}" if row["mb"] >= 100 else f"{row['mb']:.3g}",
        "/".join(map(str, row["experts"])),
    ]


def table(rows) -> str:
    dense = {(r["scope"], r["shape"], r["tokens"]): r for r in rows if r["variant"] == "dense"}
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        key = (r["scope"], r["shape"], r["tokens"])
        lines.append(
            "| "
            + " | ".join([*map(str, (r["scope"], r["shape"], r["variant"], r["tokens"])), *cells(r, dense.get(key))])
            + " |"
        )
    return "\n".join(lines)


def targets(rows, args) -> str:
    """Issue 12's targets for one MoE layer at 2:4: decode >= 1.5x dense and >= 0.75 of the byte floor,
    prefill >= 1.2x dense; every output within 1e-2 of the float32 masked dense model."""
    lines = []
    for name in args.shapes if "layer" in args.scope else []:
        dense = {
            r["tokens"]: r
            for r in rows
            if (r["scope"], r["shape"], r["variant"]) == ("layer", name, "dense") and "us" in r
        }
        sparse = {
            r["tokens"]: r
            for r in rows
            if (r["scope"], r["shape"], r["variant"]) == ("layer", name, "2:4") and "us" in r
        }

        def ratio(t):
            return f"{dense[t]['us'] / sparse[t]['us']:.2f}" if t in dense and t in sparse else "-"

        frac = "/".join(f"{sparse[t]['floor'] / sparse[t]['us']:.2f}" if t in sparse else "-" for t in args.tokens)
        lines.append(
            f"- {name} layer, 2:4: decode x dense {'/'.join(map(ratio, args.tokens))} (target 1.5), of floor {frac} "
            f"(target 0.75); prefill x dense {ratio(args.prefill)} (target 1.2)"
        )
    if any("err" in r for r in rows):
        worst = {k: max(r[k] for r in rows if k in r) for k in ("err", "eager_err")}
        lines.append(f"- largest error of any row {worst['err']:.1e}, eager {worst['eager_err']:.1e} (target 1e-2)")
    return "Targets (issue 12):\n" + "\n".join(lines)


def autotuned() -> str:
    """Configs the Triton autotuners of the sparse package chose in this run (key: N, K, BLOCK_M, ...)."""
    modules = [m for name, m in sorted(sys.modules.items()) if name.startswith("stun_lightning.sparse.")]
    found = [
        f"- {m.__name__.rsplit('.', 1)[1]}.{name} {tuple(key)[:4]}: {config}"
        for m in modules
        for name, obj in vars(m).items()
        if isinstance(getattr(obj, "cache", None), dict) and hasattr(obj, "configs")
        for key, config in obj.cache.items()
    ]
    return "Autotuned kernels:\n" + "\n".join(found) if found else "Autotuned kernels: none ran"


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
